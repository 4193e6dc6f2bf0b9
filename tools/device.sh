#!/usr/bin/env bash
# The calls that carry the project's GPU work to a lent GPU machine: a thin wrapper of tools/gpu_job.py, kept for the
# words earlier notes use. benchmarks/GPU.md lists the exact tool calls.
#
#   bash tools/device.sh prepare       HERE: .carry/bench (wheels) and .carry/tofu1, .carry/tofu2 (GGUF halves,
#                                      wheels, TOFU), git-ignored
#   bash tools/device.sh bench         THERE, one call carrying .carry/bench: the bench job
#   bash tools/device.sh stage         THERE, tofu call 1 carrying .carry/tofu1: stage its files under $STATE
#   bash tools/device.sh tofu          THERE, tofu call 2 carrying .carry/tofu2 (within 30 s of call 1): the recipe
#   bash tools/device.sh dry-run       HERE: both jobs on the CPU at tiny scale
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n 2,12p "$0"; exit 2; }
for word in "$@"; do
  case "$word" in
    prepare) python3 -m tools.gpu_job prepare bench && python3 -m tools.gpu_job prepare tofu || exit $? ;;
    bench) python3 -m tools.gpu_job run bench || exit $? ;;
    stage) python3 -m tools.gpu_job stage tofu || exit $? ;;
    tofu) python3 -m tools.gpu_job run tofu || exit $? ;;
    dry-run) python3 -m tools.gpu_job dry-run || exit $? ;;
    *) echo "device.sh: unknown word '$word' (prepare, bench, stage, tofu, dry-run)"; exit 2 ;;
  esac
done
