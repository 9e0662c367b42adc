"""Masks of two-matrix parts (LoRA A/B, adapter down/up): with `mask_pairing="aligned"` (the default) every
trainable entry can receive a gradient and the count stays exact; `"independent"` keeps the paper's masks."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import model_inputs, tiny_bert
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from peft_apet import APETConfig, APETLayer

ROOT = Path(__file__).parents[1]
PAIRS = {"lora": ("lora_A", "lora_B"), "adapter": ("adapter_down", "adapter_up")}


def small_bert():
    """Four layers, hidden 48: 8 LoRA modules of rank 4 (unit length 96) and 8 adapter modules."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                     vocab_size=96, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def preset(operation: str, mask: str, k: int | None, pairing: str = "aligned", **kwargs) -> APETConfig:
    sizes = {"r": 4} if operation == "lora" else {"bottleneck": 6, "activation": "gelu"}
    return getattr(APETConfig, operation)(mask=mask, num_trainable_params=k, mask_pairing=pairing,
                                          **sizes, **kwargs)


def pair_masks(model, operation: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """`(module, dense mask of the first matrix, dense mask of the second)` for every module of the part."""
    first, second = PAIRS[operation]
    return [(name, m.apet_weights["default"][first].dense_mask(), m.apet_weights["default"][second].dense_mask())
            for name, m in model.named_modules() if isinstance(m, APETLayer) and first in m.apet_weights["default"]]


def unlearnable(first: torch.Tensor, second: torch.Tensor) -> int:
    """Entries whose unit has no entry in the other matrix, from the dense masks: unit j is row j of the first
    `(units, ·)` and column j of the second `(·, units)`."""
    first_units, second_units = first.any(dim=1), second.any(dim=0)
    return int(first[~second_units].sum() + second[:, ~first_units].sum())


# 769 = 8 x 96 + 1 and 2,305: one entry past whole units in a module that no other module can relieve of it (each
# would then be one past whole units itself); it takes a partner's entry from another module instead.
SMALL = [2, 3, 5, 9, 17, 40, 97, 191, 193, 500, 769]
LARGE = [1_000, 2_000, 2_305, 3_071]  # LoRA capacity: 8 modules x 4 x 96 = 3,072


@pytest.mark.parametrize("operation", ["lora", "adapter"])
@pytest.mark.parametrize("mask", ["discrete", "adjacent"])
@pytest.mark.parametrize("k", SMALL + LARGE)
def test_aligned_masks_leave_no_entry_unable_to_learn(operation, mask, k):
    model = get_peft_model(small_bert(), preset(operation, mask, k, task_type="SEQ_CLS"))
    masks = pair_masks(model, operation)
    assert sum(int(a.sum() + b.sum()) for _, a, b in masks) == k
    for name, a, b in masks:
        assert unlearnable(a, b) == 0, name
        count = int(a.sum() + b.sum())
        assert count == 0 or (a.any(dim=1) & b.any(dim=0)).any(), f"{name}: {count} entries without a pair"
    assert model.base_model.learnable_entries() == (k, k)


@pytest.mark.parametrize("mask", ["discrete", "adjacent"])
@pytest.mark.parametrize("k", [7, 300, 3_000])
def test_aligned_masks_in_a_combined_adapter(mask, k):
    config = APETConfig.combine(preset("lora", mask, None), preset("adapter", mask, None),
                                APETConfig.delta(mask="discrete"), num_trainable_params=k, task_type="SEQ_CLS")
    model = get_peft_model(small_bert(), config)
    assert model.get_nb_trainable_parameters()[0] - 98 == k  # 98: the new classifier head
    for operation in PAIRS:
        for name, a, b in pair_masks(model, operation):
            assert unlearnable(a, b) == 0, (operation, name)


def test_adjacent_aligned_masks_are_whole_units():
    model = get_peft_model(small_bert(), preset("lora", "adjacent", 2 * 96 + 10, task_type="SEQ_CLS"))
    for name, a, b in pair_masks(model, "lora"):
        rows, cols = a.any(dim=1).nonzero().flatten(), b.any(dim=0).nonzero().flatten()
        assert torch.equal(rows, cols), name
        # whole rows of A and whole columns of B, except one partial row and column, of the same (last) unit
        partial_rows = [int(r) for r in rows if not a[r].all()]
        partial_cols = [int(c) for c in cols if not b[:, c].all()]
        assert partial_rows == partial_cols and len(partial_rows) <= 1, name
        if partial_rows:
            assert partial_rows[0] == int(rows[-1])


def _zero_gradient_entries(model, steps: int = 4) -> int:
    """Trainable APET entries whose gradient stayed exactly zero over `steps` SGD steps."""
    values = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".values")]
    touched = [torch.zeros_like(p, dtype=torch.bool) for p in values]
    optimizer = torch.optim.SGD(values, lr=0.5)
    for step in range(steps):
        batch = model_inputs("bert", batch=8, length=12, seed=step, labels=True)
        batch["input_ids"] = batch["input_ids"] % 96
        optimizer.zero_grad()
        model(**batch).loss.backward()
        for t, p in zip(touched, values):
            t |= p.grad != 0
        optimizer.step()
    return sum(int((~t).sum()) for t in touched)


@pytest.mark.parametrize("operation", ["lora", "adapter"])
@pytest.mark.parametrize("mask", ["discrete", "adjacent"])
def test_every_aligned_entry_receives_a_gradient(operation, mask):
    model = get_peft_model(small_bert(), preset(operation, mask, 300, task_type="SEQ_CLS"))
    model.train()
    assert _zero_gradient_entries(model) == 0


@pytest.mark.parametrize("operation", ["lora", "adapter"])
def test_independent_masks_are_kept_and_reported(operation):
    config = preset(operation, "adjacent", 300, pairing="independent", task_type="SEQ_CLS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(small_bert(), config)
    learnable, trainable = model.base_model.learnable_entries()
    expected = sum(unlearnable(a, b) for _, a, b in pair_masks(model, operation))
    assert trainable == 300 and expected > 0.01 * trainable and trainable - learnable == expected
    assert any("can never receive a gradient" in str(w.message) for w in caught)
    summary = model.base_model.adapter_summary().splitlines()
    assert summary[0].split()[-2:] == ["learnable", "trainable"]
    assert summary[-1].split()[-2:] == [str(learnable), "300"]
    model.train()
    assert _zero_gradient_entries(model) == expected  # with gelu, an unlearnable entry is exactly a zero gradient


def test_aligned_config_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(small_bert(), preset("lora", "adjacent", 300, task_type="SEQ_CLS"))


def test_adapter_saved_without_the_field_loads_as_independent(tmp_path):
    """adapter_config.json of peft-apet 0.1 has no `mask_pairing`: it reloads with its own (independent) masks and
    identical outputs."""
    config = preset("lora", "adjacent", 300, pairing="independent", task_type="SEQ_CLS", init_weights=False)
    model = get_peft_model(tiny_bert(), config)
    inputs = model_inputs("bert")
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["parts"][0]["mask_pairing"] == "independent"
    del saved["parts"][0]["mask_pairing"]
    path.write_text(json.dumps(saved))
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert reloaded.peft_config["default"].parts[0].mask_pairing == "independent"
    torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("operation", ["lora", "adapter"])
def test_adapter_saved_with_the_first_budget_split_reloads_with_it(tmp_path, operation):
    """adapter_config.json without `budget_split_version` (peft-apet 0.1, 0.2.0.dev0) keeps the module split it was
    saved with, one adjacent entry unable to learn included; new configs write version 2 and split without it."""
    k = 8 * 96 + 1
    old = preset(operation, "adjacent", k, task_type="SEQ_CLS", init_weights=False, budget_split_version=1)
    model = get_peft_model(small_bert(), old)
    assert model.base_model.learnable_entries() == (k - 1, k)
    inputs = model_inputs("bert")
    inputs["input_ids"] = inputs["input_ids"] % 96
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "old")
    assert "budget_split_version" not in json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    reloaded = PeftModel.from_pretrained(small_bert(), tmp_path / "old")
    assert reloaded.peft_config["default"].budget_split_version == 1
    assert reloaded.base_model.learnable_entries() == (k - 1, k)
    torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=0)

    new = get_peft_model(small_bert(), preset(operation, "adjacent", k, task_type="SEQ_CLS", init_weights=False))
    new.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["budget_split_version"] == 2
    reloaded = PeftModel.from_pretrained(small_bert(), tmp_path / "new")
    assert reloaded.base_model.learnable_entries() == (k, k)
    torch.testing.assert_close(reloaded(**inputs).logits, new(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`budget_split_version` must be one of \[1, 2\], got 3"):
        APETConfig.lora(mask="adjacent", num_trainable_params=k, budget_split_version=3)


def test_new_configs_are_aligned_and_round_trip(tmp_path):
    model = get_peft_model(tiny_bert(), preset("adapter", "discrete", 50, task_type="SEQ_CLS", init_weights=False))
    inputs = model_inputs("bert")
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert reloaded.peft_config["default"].parts[0].mask_pairing == "aligned"
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_pairing_settings_are_validated():
    with pytest.raises(ValueError, match=r"`mask_pairing` must be one of \['aligned', 'independent'\]"):
        APETConfig.lora(mask="discrete", num_trainable_params=10, mask_pairing="paired")
    with pytest.raises(ValueError, match=r"mask_axis=1 with mask_pairing='aligned'.*mask_pairing='independent'"):
        APETConfig.adapter(mask="adjacent", num_trainable_params=10, mask_axis=1)
    APETConfig.adapter(mask="adjacent", num_trainable_params=10, mask_axis=1, mask_pairing="independent")
    lone = APETConfig.combine(preset("lora", "discrete", 1), APETConfig.bitfit(), task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"part 'lora': a budget of 1 entry cannot hold a pair"):
        get_peft_model(small_bert(), lone)


def test_pairing_benchmark_smoke(tmp_path):
    """`python -m benchmarks.pairing --smoke`: aligned masks leave nothing structurally unable to learn, independent
    ones do, and the gradient count includes the structural one."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.pairing", "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 3 * 2 * 2 * 2
    for row in rows:
        assert row["zero_gradient"] >= row["unlearnable_structural"]
        if row["pairing"] == "aligned":
            assert row["unlearnable_structural"] == 0
    independent_adjacent = [r for r in rows if r["pairing"] == "independent" and r["mask"] == "adjacent"]
    assert independent_adjacent and all(r["unlearnable_structural"] > 0 for r in independent_adjacent)
    assert (tmp_path / "results.md").read_text().count("| aligned |") == 6


def test_readme_numbers_come_from_the_pairing_results():
    """The README's shares of unlearnable budget are the min-max of the committed `benchmarks/pairing.py` results."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "pairing" / "results.json").read_text())["rows"]

    def span(key: str, **where) -> str:
        shares = [r[key] / r["trainable"] for r in rows if all(r[k] == v for k, v in where.items())]
        return f"{min(shares):.0%}-{max(shares):.0%}".replace("%-", "-")

    readme = (ROOT / "README.md").read_text()
    lora = span("unlearnable_structural", part="lora", mask="adjacent", pairing="independent")
    adapter = span("unlearnable_structural", part="adapter", mask="adjacent", pairing="independent", activation="gelu")
    relu = span("zero_gradient", part="adapter", pairing="aligned", activation="relu")
    assert f"{lora} of an adjacent masked LoRA's entries and {adapter} of an adjacent" in readme.replace("\n", " ")
    assert f"({relu} of its entries got no gradient" in readme.replace("\n", " ")
