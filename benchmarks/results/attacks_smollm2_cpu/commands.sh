#!/bin/bash
# The exact commands behind this folder (2-core CPU, shared; every process 1 thread, nice 5). `bs-unlearn` is
# `python -m bs_train.cli` (pyproject's entry point); the TOFU slice and the models live in /tmp and are not committed.
set -e
export OMP_NUM_THREADS=1

# the slice: TOFU's first author as the retain set (retain90, 20 rows), its last (inside TOFU's forget01) as forget10
python -m tools.tofu_mini --data ../shared/data/tofu --out /tmp/i15/tofu2 --retain-authors 1

# original (both authors, 40 rows) and retain model (the first author only), 2 epochs of batch 8 at lr 5e-4, cosine
FT="--config configs/finetune_tofu_smollm2.yaml --no-progress data.source=/tmp/i15/tofu2 train.epochs=2 \
    train.batch_size=8 train.grad_accum=1 train.lr=5e-4 train.warmup_steps=1 train.schedule=cosine train.checkpoint_every=0"
nice -n 5 bs-unlearn finetune $FT output_dir=/tmp/i15/runs/original data.train_split=full &
nice -n 5 bs-unlearn finetune $FT output_dir=/tmp/i15/runs/retain data.train_split=retain90 &
wait

# unlearn forget10 (all 20 rows of the forget author) from the original: 1 epoch of batch 4 (5 steps) at lr 1e-4;
# npo was started too and stopped after 2 of its 5 steps (the shared CPU gave each process ~12% of a core), so it
# has no final/ and is not attacked
UL="--config configs/unlearn_tofu_smollm2.yaml --no-progress model.path=/tmp/i15/runs/original/final \
    data.source=/tmp/i15/tofu2 train.lr=1e-4 train.epochs=1 train.batch_size=4 train.grad_accum=1 train.warmup_steps=1 \
    train.checkpoint_every=0"
for m in ga npo bs_t; do nice -n 5 bs-unlearn unlearn $UL method.name=$m output_dir=/tmp/i15/runs/$m & done
wait

# the attacks, scored on forget05 (the forget author's last 10 questions: 1 relearned, 9 held out); relearning steps
# 0/1/5 and 48 new tokens (not 0/1/2/5 and 64) to fit the session on the loaded CPU
nice -n 5 bs-unlearn attack /tmp/i15/runs/ga /tmp/i15/runs/bs_t --original /tmp/i15/runs/original \
    --retain-model /tmp/i15/runs/retain --forget-split forget05 --relearn-steps 0,1,5 --samples 8 \
    --max-new-tokens 48 --batch-size 20 --out /tmp/i15/res/attacks_smollm2_cpu
