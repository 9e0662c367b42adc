#!/usr/bin/env bash
# GPU check of issue 14, under 8 minutes on one GPU (run from the repository root, in an environment with
# peft-apet installed, e.g. `pip install -e ".[test,bench]"` beside a CUDA torch):
#   (a) every discrete/adjacent delta route on CUDA against the dense formula, fp32 and bf16 autocast
#       (tests/test_gpu_routes.py; its CUDA cases run only where torch sees a GPU);
#   (b) a reduced speed grid on CUDA: BERT-base and the 0.5B Llama at 2,048 tokens (16 x 128), density 1e-3 and
#       1/8, q/v and all-linear, every method (SpaRTA if peft-sparta is installed), in fp32; then BERT-base again
#       under bf16 autocast. Results: benchmarks/results/speed_grid_cuda_reduced/ and .../speed_grid_cuda_bf16/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
python -c "import peft_sparta" 2>/dev/null || echo "peft-sparta not installed: the grid runs without SpaRTA" >&2

start=$SECONDS
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_gpu_routes.py
python - <<'PY'
import sys
import pytest
# every route must have run on CUDA: collect the CUDA cases and fail if there are none
sys.exit(0 if pytest.main(["-q", "--co", "-p", "no:cacheprovider", "tests/test_gpu_routes.py", "-k", "cuda"]) == 0
         else "no CUDA cases were collected")
PY
echo "routes checked in $((SECONDS - start)) s"
timeout 240 python -m benchmarks.speed_grid --device cuda --reduced
timeout 90 python -m benchmarks.speed_grid --device cuda --reduced --bf16 --only bert-base \
  --out benchmarks/results/speed_grid_cuda_bf16
echo "gpu_check done in $((SECONDS - start)) s"
