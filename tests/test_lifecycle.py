"""The PEFT lifecycle of APET adapters over the test matrix: model types x operations x masks.

Exact budgets, identity at init, training touches only the intended entries, optimizer state is O(k), merge,
disable, several adapters, Trainer with resume.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import MODELS, model_inputs, model_output, tiny_gpt2
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

import peft_apet
from peft_apet import APETConfig, APETLayer, count_trainable_parameters

OPERATIONS = ["lora", "adapter", "bias", "delta"]
MASKS = [None, "adjacent", "discrete"]


def make_config(operation: str, task_type: str, mask=None, k=None, **kwargs) -> APETConfig:
    budget = {"mask": mask, "num_trainable_params": k} if mask else {"mask": None}
    preset = {"lora": APETConfig.lora, "adapter": APETConfig.adapter, "bias": APETConfig.bitfit,
              "delta": APETConfig.delta}[operation]
    return preset(task_type=task_type, **budget, **kwargs)


def adapter_entries(model) -> int:
    """Trainable adapter entries: all trainable parameters minus modules_to_save copies."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n)


def apet_values(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".apet_weights." in n}


def train_steps(model, name: str, steps: int = 3, lr: float = 1e-2) -> torch.optim.Optimizer:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = model(**model_inputs(name, labels=True, seed=10 + step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("mask", ["adjacent", "discrete"])
def test_exact_budget_for_awkward_counts(model_name, operation, mask):
    factory, task_type = MODELS[model_name]
    capacity = count_trainable_parameters(factory(), make_config(operation, task_type))
    for k in (1, 7, 97, capacity):
        config = make_config(operation, task_type, mask, k)
        if k == 1 and operation in ("lora", "adapter"):  # aligned masks need a pair: one entry is refused...
            with pytest.raises(ValueError, match="a budget of 1 entry cannot hold a pair"):
                get_peft_model(factory(), config)
            config.parts[0].mask_pairing = "independent"  # ...and kept as the paper's independent masks
        model = get_peft_model(factory(), config)
        assert adapter_entries(model) == k, (k, model.base_model.adapter_summary())
        assert count_trainable_parameters(factory(), config) == k


def test_budget_larger_than_capacity_names_the_range(model_name):
    factory, task_type = MODELS[model_name]
    capacity = count_trainable_parameters(factory(), make_config("lora", task_type))
    base = factory()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=rf"num_trainable_params.*{capacity}"):
        get_peft_model(base, make_config("lora", task_type, "discrete", capacity + 1))
    assert not any(isinstance(m, APETLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("mask", MASKS)
def test_identity_at_init(model_name, operation, mask):
    factory, task_type = MODELS[model_name]
    inputs = model_inputs(model_name)
    expected = model_output(factory(), inputs)
    model = get_peft_model(factory(), make_config(operation, task_type, mask, 50 if mask else None))
    torch.testing.assert_close(model_output(model, inputs), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("mask", MASKS)
def test_training_changes_only_the_intended_entries(model_name, operation, mask):
    factory, task_type = MODELS[model_name]
    k = 60 if mask else None
    model = get_peft_model(factory(), make_config(operation, task_type, mask, k))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    values_before = {n: p.detach().clone() for n, p in apet_values(model).items()}
    inputs = model_inputs(model_name)
    out_before = model_output(model, inputs)

    optimizer = train_steps(model, model_name)

    assert not torch.allclose(model_output(model, inputs), out_before)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, values_before[n]) for n, p in apet_values(model).items())
    # Optimizer state is O(k): AdamW keeps two moments per trainable entry, so for a masked part the state of the
    # APET parameters is exactly 2 * k numbers (the budget asked for, not what the parameters happen to hold).
    apet_ids = {id(p) for p in apet_values(model).values()}
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel()
                  for p, s in optimizer.state.items() if id(p) in apet_ids)
    if mask:
        assert moments == 2 * k
    if operation == "delta":
        # The weight change lies on at most k entries: probe each layer's forward with the identity, which returns
        # `W_effective^T` (so through the kernels that train, not through the index bookkeeping), and compare with
        # the base layer's.
        changed = 0
        for module in model.modules():
            if isinstance(module, APETLayer):
                eye = torch.eye(module.in_features)
                with torch.no_grad():
                    effective_change = (module(eye) - module.get_base_layer()(eye)).T  # (out, in)
                moved = effective_change != 0
                changed += int(moved.sum())
                assert not moved[~module.apet_weights["default"]["delta"].dense_mask()].any()
        if mask:
            assert 0 < changed <= k
        else:
            assert changed > 0


@pytest.mark.parametrize("operation", ["lora", "bias", "delta"])
@pytest.mark.parametrize("mask", MASKS)
def test_merge_matches_the_unmerged_forward(model_name, operation, mask):
    factory, task_type = MODELS[model_name]
    inputs = model_inputs(model_name)
    base_out = model_output(factory(), inputs)
    model = get_peft_model(factory(), make_config(operation, task_type, mask, 40 if mask else None,
                                                   init_weights=False))
    adapted = model_output(model, inputs)
    assert not torch.allclose(adapted, base_out)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, inputs), base_out, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, APETLayer) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, inputs), adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_exactly_the_base_outputs(model_name):
    factory, task_type = MODELS[model_name]
    inputs = model_inputs(model_name)
    expected = model_output(factory(), inputs)
    config = APETConfig.combine(APETConfig.lora(), APETConfig.adapter(), APETConfig.bitfit(),
                                APETConfig.delta(mask="discrete", num_trainable_params=50), task_type=task_type,
                                init_weights=False)
    model = get_peft_model(factory(), config)
    assert not torch.allclose(model_output(model, inputs), expected)
    with model.disable_adapter():
        assert torch.equal(model_output(model, inputs), expected)


def test_unmergeable_parts_refuse_to_merge_and_change_nothing():
    factory, task_type = MODELS["bert"]
    config = APETConfig.combine(APETConfig.lora(), APETConfig.adapter(), task_type=task_type, init_weights=False)
    model = get_peft_model(factory(), config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['adapter'\]"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="adapter"):
        model.merge_adapter()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_several_adapters_switch_add_and_delete(model_name):
    factory, task_type = MODELS[model_name]
    inputs = model_inputs(model_name)
    first = APETConfig.lora(task_type=task_type, init_weights=False, seed=1)
    second = APETConfig.delta(mask="discrete", num_trainable_params=77, task_type=task_type, init_weights=False,
                              seed=2)
    expected_first = model_output(get_peft_model(factory(), copy.deepcopy(first)), inputs)
    expected_second = model_output(get_peft_model(factory(), copy.deepcopy(second)), inputs)

    model = get_peft_model(factory(), first)
    model.add_adapter("second", second)
    # A newly added adapter starts frozen: only the active one trains.
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    torch.testing.assert_close(model_output(model, inputs), expected_first)
    model.set_adapter("second")
    torch.testing.assert_close(model_output(model, inputs), expected_second)
    assert adapter_entries(model) == 77
    model.delete_adapter("default")
    torch.testing.assert_close(model_output(model, inputs), expected_second)
    assert not any(".default" in n for n, _ in model.named_parameters() if ".apet_" in n)


def test_print_trainable_parameters_reports_the_budget(capsys):
    factory, task_type = MODELS["llama"]
    model = get_peft_model(factory(), APETConfig.lora(mask="discrete", num_trainable_params=1009,
                                                      task_type=task_type))
    model.print_trainable_parameters()
    assert "trainable params: 1,009 " in capsys.readouterr().out
    assert model.get_nb_trainable_parameters()[0] == 1009


def test_importing_twice_is_harmless():
    importlib.reload(peft_apet.registration)
    importlib.reload(peft_apet)
    assert peft_apet.is_registered()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["APET"] is peft_apet.APETConfig
    factory, task_type = MODELS["bert"]
    model = get_peft_model(factory(), peft_apet.APETConfig.lora(task_type=task_type))
    assert any(isinstance(m, peft_apet.APETLayer) for m in model.modules())


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_merging_into_a_tied_weight_is_refused_before_any_change(merge):
    """GPT-2's lm_head shares its weight with the input embedding: a lora merged into it would change the
    embedding too. Refused, naming the tied parameters; an adapter on untied layers still merges."""
    model = get_peft_model(tiny_gpt2(), APETConfig.lora(r=4, target_modules=["c_attn", "lm_head"],
                                                       task_type="CAUSAL_LM", init_weights=False)).eval()
    inputs = model_inputs("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output = model_output(model, inputs)
    with pytest.raises(ValueError, match=r"lm_head.*tied to .*wte.weight.*Nothing was changed"):
        getattr(model, merge)()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model_output(model, inputs), output)
    untied = get_peft_model(tiny_gpt2(), APETConfig.lora(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                                        init_weights=False)).eval()
    expected = model_output(untied, inputs)
    torch.testing.assert_close(model_output(untied.merge_and_unload(), inputs), expected)
