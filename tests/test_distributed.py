"""Data-parallel training: `torchrun --nproc_per_node 2` (CPU, gloo) with the HF `Trainer` gives the adapter one
process gives with the same global batch, and only rank 0 writes it. The training script is `ddp_train.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "ddp_train.py"
GLOBAL_BATCH = 8


def run(command: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([*command, str(SCRIPT), str(out), str(GLOBAL_BATCH)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_two_processes_train_the_same_adapter_as_one(tmp_path):
    run([sys.executable], tmp_path / "single")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "ddp")

    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert single.keys() == ddp.keys()
    values = [k for k in single if k.endswith(".values")]
    assert values and any(single[k].abs().max() > 0 for k in values)  # the adapter was trained
    for key in single:
        if key.endswith(".index"):
            assert torch.equal(single[key], ddp[key]), key
        else:  # gradients are all-reduced in another order: equal up to float rounding
            torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)
    assert (tmp_path / "single" / "writes.txt").read_text().split() == ["0"]
    assert (tmp_path / "ddp" / "writes.txt").read_text().split() == ["0"]
