#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU:
#   bash bench/gpu_check.sh            # tests/test_cuda.py, then a short Flickr8k training on one GPU
# 1. tests/test_cuda.py: fp16 (with the gradient scaler) and bf16 training steps, resume, GPU decoding equal to the
#    CPU's, `captioning train/caption --device cuda`, and two-process NCCL DDP when two GPUs are present.
# 2. The flickr8k-attention recipe's cross-entropy stage for 2 epochs on the GPU (needs Flickr8k: CAPTIONING_FLICKR8K
#    or ../shared/data/flickr8k); prints training captions/s per epoch and the dev figures.
# Record what it prints in bench/RESULTS.md with the date, commit and GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
$PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to PyTorch: nothing to check')"
$PYTHON -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| count', torch.cuda.device_count(), '| torch', torch.__version__)"
$PYTHON -m pytest tests/test_cuda.py -v -rs
OUT=${OUT:-runs}/gpu-check
$PYTHON -m captioning.cli train --recipe flickr8k-attention --device cuda --epochs 2 --self-critical-epochs 0 \
    --output "$OUT/flickr8k-attention" --restart
