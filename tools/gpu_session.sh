#!/usr/bin/env bash
# Everything the GPU machine owes this project, as one command: the GPU test tier, then the loss, sampler and
# train-step benchmarks.
# Writes JSON and logs under $OUT (the device tool's output folder; defaults to ./gpu_out). Wheels missing from the
# image (liger-kernel, cut-cross-entropy, torchao for the train-step benchmark) may be carried in .whl/ as the
# device README shows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -m pytest -q tests/test_gpu.py tests/test_token_scores.py tests/test_sampler.py 2>&1 | tee "$OUT/gpu_tests.log"
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
python3 -m benchmarks.bench_losses --out "$OUT/losses_${device}.json" 2>&1 | tee "$OUT/bench_losses.log"
python3 -m benchmarks.bench_sampler --out "$OUT/sampler_${device}.json" 2>&1 | tee "$OUT/bench_sampler.log"
python3 -m benchmarks.bench_train_step --out "$OUT/train_step_${device}.json" 2>&1 | tee "$OUT/bench_train_step.log"
