"""Adapter folders written by peft-apet 0.1.0 (`tests/fixtures/adapters_0_1/`) load unchanged and give the same
outputs; today's code, given the same config and seed, writes the same bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import MODELS
from peft import PeftModel
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_adapter_folders import FOLDER, cases, write  # noqa: E402

CASES = cases()


def test_every_case_has_a_folder():
    assert sorted(p.name for p in FOLDER.iterdir()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_folder_loads_with_the_same_outputs(name):
    model_name = CASES[name][0]
    expected = load_file(FOLDER / name / "expected.safetensors")
    logits = expected.pop("logits")
    model = PeftModel.from_pretrained(MODELS[model_name][0](), FOLDER / name).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**expected).logits, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_config_and_seed_write_the_same_bytes(name, tmp_path):
    write(name, *CASES[name], tmp_path)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name / file).read_bytes() == (FOLDER / name / file).read_bytes(), file
