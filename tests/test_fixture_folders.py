"""Adapter folders written by peft-apet 0.1.0 (`tests/fixtures/adapters_0_1/`, per-module tensors) load unchanged
and give the same outputs; today's code, given the same config and seed, writes the same adapter (packed:
`peft_apet.packing`) and the same `adapter_config.json` bytes, and save -> load -> save is byte-identical."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODELS
from peft import PeftModel
from safetensors.torch import load_file, save_file

from peft_apet import APETLayer

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


def _tensors(model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every APET tensor's values and decoded mask (row-major flat positions), by parameter path."""
    return {f"{name}.{role}": (weight.values.detach().clone(), weight.flat_indices())
            for name, module in model.named_modules() if isinstance(module, APETLayer)
            for role, weight in module.apet_weights["default"].items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_config_and_seed_write_the_same_adapter(name, tmp_path):
    model_name = CASES[name][0]
    write(name, *CASES[name], tmp_path)
    # the one field added since: today's configs split budgets by rule 2, the same split for every case here
    fresh_config = (tmp_path / name / "adapter_config.json").read_bytes()
    line = b'  "budget_split_version": 2,\n'
    assert fresh_config.count(line) == 1
    assert fresh_config.replace(line, b"") == (FOLDER / name / "adapter_config.json").read_bytes()
    fresh, old = (PeftModel.from_pretrained(MODELS[model_name][0](), folder / name) for folder in (tmp_path, FOLDER))
    fresh_tensors, old_tensors = _tensors(fresh), _tensors(old)
    assert fresh_tensors.keys() == old_tensors.keys() and fresh_tensors
    for key, (values, positions) in old_tensors.items():
        assert torch.equal(fresh_tensors[key][0], values) and fresh_tensors[key][0].dtype == values.dtype, key
        assert torch.equal(fresh_tensors[key][1], positions), key
    fresh_other = {k: v for k, v in fresh.state_dict().items() if ".apet_weights." not in k}
    for key, value in old.state_dict().items():  # heads (modules_to_save), token rows: the same too
        if ".apet_weights." not in key:
            assert torch.equal(fresh_other[key], value), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_save_is_byte_identical(name, tmp_path):
    model_name = CASES[name][0]
    write(name, *CASES[name], tmp_path)
    PeftModel.from_pretrained(MODELS[model_name][0](), tmp_path / name).save_pretrained(tmp_path / "again")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "again" / file).read_bytes() == (tmp_path / name / file).read_bytes(), file


def test_an_old_file_missing_a_mask_index_is_refused(tmp_path):
    """A 0.1 per-module file without some `.index` tensors would load with masks drawn from the seed instead of
    the saved ones: refused, naming the module."""
    folder = tmp_path / "adapter"
    shutil.copytree(FOLDER / "bert-delta-gradient-global", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    dropped = [key for key in tensors if key.endswith(".index") and tensors[key].numel()][:2]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})
    base = MODELS[CASES["bert-delta-gradient-global"][0]][0]()
    with pytest.raises(ValueError, match=r"no `index` tensor \(the discrete mask"):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, APETLayer) for m in base.modules())
