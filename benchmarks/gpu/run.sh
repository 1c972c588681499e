#!/usr/bin/env bash
# hf_localist GPU benchmark: flex (bf16) vs sdpa / flash at S = 4k-32k, K = 4, 8, 16, on one GPU, in a few minutes.
# Usage: bash benchmarks/gpu/run.sh [extra args for bench_gpu.py]   (e.g. --seqs 4096 8192)
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
python benchmarks/gpu/bench_gpu.py "$@"
