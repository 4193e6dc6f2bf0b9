#!/usr/bin/env bash
# Everything a GPU machine owes the project's benchmarks, as one command: now the `bench` job of tools/gpu_job.py
# (the GPU test tier, the loss sweep, the loss, sampler and train-step benchmarks, each stage under its own cap),
# JSON lines and logs under $OUT (default ./gpu_out). Wheels it needs travel in .carry/bench (gpu_job.py prepare bench).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tools.gpu_job run bench "$@"
