"""Every config field is validated on construction, and every target / budget error is raised before the model is
touched: a `ValueError` that names the field and what it may be."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from conftest import MODELS, model_inputs, model_output, tiny_bert
from peft import get_peft_model
from torch import nn

from peft_apet import APETConfig, APETLayer, APETPart, count_trainable_parameters

OPERATIONS = r"\['prompt', 'lora', 'adapter', 'bias', 'delta'\]"
MASKS = r"\['adjacent', 'discrete'\] or None"

# (field, part or config kwargs, regex the message must match: the field and, where there is a list, its values)
_SCORED = {"operation": "delta", "mask": "discrete", "density": 0.5, "mask_strategy": "sam"}
BAD_PART_FIELDS = [
    ("operation", {"operation": "prefix"}, rf"`operation`.*{OPERATIONS}"),
    ("operation", {"operation": 3}, rf"`operation`.*{OPERATIONS}"),
    ("target_modules", {"target_modules": []}, r"`target_modules`.*non-empty"),
    ("target_modules", {"target_modules": ""}, r"`target_modules`.*non-empty"),
    ("target_modules", {"target_modules": ["query", 1]}, r"`target_modules`.*list of module-name suffixes"),
    ("target_modules", {"target_modules": 5}, r"`target_modules`.*regex string"),
    ("exclude_modules", {"exclude_modules": []}, r"`exclude_modules`.*non-empty"),
    ("exclude_modules", {"exclude_modules": 7}, r"`exclude_modules`"),
    ("mask", {"mask": "random"}, rf"`mask`.*{MASKS}"),
    ("mask", {"mask": 1}, rf"`mask`.*{MASKS}"),
    ("mask_axis", {"mask": "adjacent", "mask_axis": 2, "density": 0.5}, r"`mask_axis`.*\[0, 1\]"),
    ("mask_axis", {"mask": "adjacent", "mask_axis": True, "density": 0.5}, r"`mask_axis`.*\[0, 1\]"),
    ("mask_axis", {"mask": "adjacent", "mask_axis": 1.0, "density": 0.5}, r"`mask_axis`.*\[0, 1\]"),
    ("mask_axis", {"mask": "adjacent", "mask_axis": "0", "density": 0.5}, r"`mask_axis`.*\[0, 1\]"),
    ("mask_pairing", {"mask": "discrete", "density": 0.5, "mask_pairing": "paired"},
     r"`mask_pairing`.*\['aligned', 'independent'\]"),
    ("mask_pairing", {"mask": "adjacent", "mask_axis": 1, "density": 0.5}, r"mask_axis=1 with mask_pairing='aligned'"),
    ("num_trainable_params", {"mask": "discrete", "num_trainable_params": 0}, r"`num_trainable_params`.*>= 1"),
    ("num_trainable_params", {"mask": "discrete", "num_trainable_params": -5}, r"`num_trainable_params`.*>= 1"),
    ("num_trainable_params", {"mask": "discrete", "num_trainable_params": 2.5}, r"`num_trainable_params`.*int"),
    ("num_trainable_params", {"mask": "discrete", "num_trainable_params": True}, r"`num_trainable_params`.*int"),
    ("num_trainable_params", {"mask": "discrete", "num_trainable_params": "10"}, r"`num_trainable_params`.*int"),
    ("num_trainable_params", {"num_trainable_params": 10}, rf"budget needs `mask`.*{MASKS[:-11]}"),
    ("density", {"mask": "discrete", "density": 0}, r"`density`.*\(0, 1\]"),
    ("density", {"mask": "discrete", "density": -0.1}, r"`density`.*\(0, 1\]"),
    ("density", {"mask": "discrete", "density": 1.5}, r"`density`.*\(0, 1\]"),
    ("density", {"mask": "discrete", "density": math.nan}, r"`density`.*\(0, 1\]"),
    ("density", {"mask": "discrete", "density": True}, r"`density`.*\(0, 1\]"),
    ("density", {"mask": "discrete", "density": "0.5"}, r"`density`.*\(0, 1\]"),
    ("density", {"mask": "discrete", "density": 0.5, "num_trainable_params": 3}, r"`num_trainable_params` or "
                                                                                 r"`density`, not both"),
    ("r", {"r": 0}, r"`r`.*positive int"),
    ("r", {"r": 2.0}, r"`r`.*positive int"),
    ("r", {"r": True}, r"`r`.*positive int"),
    ("r", {"operation": "bias", "r": 4}, r"`r` is only used by operation 'lora'"),
    ("lora_alpha", {"lora_alpha": "8"}, r"`lora_alpha`.*finite number"),
    ("lora_alpha", {"lora_alpha": math.inf}, r"`lora_alpha`.*finite number"),
    ("lora_alpha", {"lora_alpha": math.nan}, r"`lora_alpha`.*finite number"),
    ("lora_alpha", {"operation": "delta", "lora_alpha": 4.0}, r"`lora_alpha` is only used by operation 'lora'"),
    ("lora_dropout", {"lora_dropout": 1.0}, r"`lora_dropout`.*\[0, 1\)"),
    ("lora_dropout", {"lora_dropout": -0.1}, r"`lora_dropout`.*\[0, 1\)"),
    ("lora_dropout", {"lora_dropout": False}, r"`lora_dropout`.*\[0, 1\)"),
    ("lora_dropout", {"lora_dropout": "0"}, r"`lora_dropout`.*\[0, 1\)"),
    ("bottleneck", {"operation": "adapter", "bottleneck": 0}, r"`bottleneck`.*positive int"),
    ("bottleneck", {"operation": "adapter", "bottleneck": 1.5}, r"`bottleneck`.*positive int"),
    ("bottleneck", {"operation": "lora", "bottleneck": 4}, r"`bottleneck` is only used by operation 'adapter'"),
    ("activation", {"operation": "adapter", "activation": "swish"},
     r"`activation`.*\['relu', 'gelu', 'silu', 'tanh', 'sigmoid', 'identity'\]"),
    ("activation", {"operation": "bias", "activation": "relu"}, r"`activation` is only used by operation 'adapter'"),
    ("num_virtual_tokens", {"operation": "prompt", "num_virtual_tokens": 0}, r"`num_virtual_tokens`.*positive int"),
    ("num_virtual_tokens", {"operation": "prompt", "num_virtual_tokens": "3"}, r"`num_virtual_tokens`.*positive"),
    ("num_virtual_tokens", {"operation": "lora", "num_virtual_tokens": 3}, r"only used by operation 'prompt'"),
    ("prompt_init", {"operation": "prompt", "prompt_init": "vocab"}, r"`prompt_init`.*\['random', 'text'\]"),
    ("prompt_init_text", {"operation": "prompt", "prompt_init_text": 5}, r"`prompt_init_text`.*str or None"),
    ("prompt_init_text", {"operation": "prompt", "prompt_init": "text"}, r"`prompt_init_text` and "
                                                                         r"`tokenizer_name_or_path`"),
    ("tokenizer_name_or_path", {"operation": "prompt", "tokenizer_name_or_path": 5},
     r"`tokenizer_name_or_path`.*str or None"),
    ("target_modules", {"operation": "prompt", "target_modules": ["query"]}, r"`target_modules` must be None"),
    ("mask_strategy", {"mask_strategy": ""}, r"`mask_strategy` must be a non-empty str"),
    ("mask_strategy", {"mask_strategy": "sam"}, r"mask_strategy='sam'.*\['delta', 'bias'\]"),
    ("mask_strategy", {"operation": "delta", "mask_strategy": "fisher"}, r"mask_strategy='fisher'.*set `mask`"),
    ("mask_strategy", {**_SCORED, "mask_strategy": "nope"}, r"unknown mask_strategy 'nope'; known: \['random', "),
    ("mask_strategy_kwargs", {**_SCORED, "mask_strategy_kwargs": {"damping": -1}},
     r"`mask_strategy_kwargs\['damping'\]`.*non-negative"),
    ("mask_strategy_kwargs", {**_SCORED, "mask_strategy_kwargs": {"beta": 1}}, r"takes settings \['damping'\]"),
    ("mask_strategy_kwargs", {**_SCORED, "mask_strategy_kwargs": {"damping": math.nan}}, r"JSON values"),
    ("mask_counts", {**_SCORED, "mask_counts": {"query": -1}}, r"`mask_counts` must map module names"),
    ("mask_counts", {"mask_counts": {"query": 1}}, r"`mask_counts` belong to a non-random `mask_strategy`"),
    ("delta_dropout", {"operation": "delta", "delta_dropout": 1.0}, r"`delta_dropout`.*\[0, 1\)"),
    ("delta_dropout", {"operation": "bias", "delta_dropout": -0.1}, r"`delta_dropout`.*\[0, 1\)"),
    ("delta_dropout", {"operation": "delta", "delta_dropout": True}, r"`delta_dropout`.*\[0, 1\)"),
    ("delta_dropout", {"operation": "delta", "delta_dropout": math.nan}, r"`delta_dropout`.*\[0, 1\)"),
    ("delta_dropout", {"operation": "lora", "delta_dropout": 0.1},
     r"`delta_dropout` is only used by operations \['bias', 'delta'\]"),
]

_PART = [{"operation": "lora"}]
BAD_CONFIG_FIELDS = [
    ("parts", {"parts": []}, r"`parts`.*non-empty list"),
    ("parts", {"parts": "lora"}, r"`parts`.*non-empty list"),
    ("parts", {"parts": [5]}, r"`parts` entries must be APETPart or dict"),
    ("parts", {"parts": [{"operation": "lora", "rank": 4}]}, r"\['rank'\].*allowed: \['operation', "),
    ("parts", {"parts": [{"operation": "lora"}, {"operation": "bias"}, {"operation": "lora", "r": 2}]},
     r"`parts` has duplicated operations \['lora'\]"),
    ("num_trainable_params", {"parts": _PART, "num_trainable_params": 0}, r"`num_trainable_params`.*>= 1"),
    ("num_trainable_params", {"parts": _PART, "num_trainable_params": 1.5}, r"`num_trainable_params`.*int"),
    ("density", {"parts": _PART, "density": 2}, r"`density`.*\(0, 1\]"),
    ("density", {"parts": _PART, "density": 0.1, "num_trainable_params": 4}, r"not both"),
    ("seed", {"parts": _PART, "seed": -1}, r"`seed`.*non-negative int"),
    ("seed", {"parts": _PART, "seed": 1.5}, r"`seed`.*non-negative int"),
    ("seed", {"parts": _PART, "seed": True}, r"`seed`.*non-negative int"),
    ("init_weights", {"parts": _PART, "init_weights": 1}, r"`init_weights`.*bool"),
    ("inference_mode", {"parts": _PART, "inference_mode": "no"}, r"`inference_mode`.*bool"),
    ("modules_to_save", {"parts": _PART, "modules_to_save": "classifier"}, r"`modules_to_save`.*list"),
    ("modules_to_save", {"parts": _PART, "modules_to_save": [1]}, r"`modules_to_save`.*list"),
    ("modules_to_save", {"parts": _PART, "modules_to_save": 5}, r"`modules_to_save`.*list"),
    ("task_type", {"parts": _PART, "task_type": "seq_cls"}, r"`task_type`.*'SEQ_CLS'"),
    ("task_type", {"parts": [{"operation": "prompt"}]}, r"'prompt' part needs `task_type`.*'SEQ_CLS'"),
    ("base_model_name_or_path", {"parts": _PART, "base_model_name_or_path": 5}, r"`base_model_name_or_path`.*str"),
    ("revision", {"parts": _PART, "revision": 5}, r"`revision`.*str or None"),
    ("selection_scope", {"parts": _PART, "selection_scope": "layer"}, r"`selection_scope`.*\['module', 'global'\]"),
    ("budget_split_version", {"parts": _PART, "budget_split_version": 0}, r"`budget_split_version`.*\[1, 2\]"),
    ("budget_split_version", {"parts": _PART, "budget_split_version": True}, r"`budget_split_version`.*\[1, 2\]"),
    ("selection_scope", {"parts": _PART, "selection_scope": "global"}, r"selection_scope='global'.*`mask_strategy`"),
    ("selection_scope", {"parts": [{"operation": "delta", "mask": "adjacent", "density": 0.1,
                                    "mask_strategy": "magnitude"}], "selection_scope": "global"},
     r"'global' needs discrete masks"),
    ("trainable_token_indices", {"parts": _PART, "trainable_token_indices": [1, -2]},
     r"`trainable_token_indices`.*ints >= 0"),
    ("trainable_token_indices", {"parts": _PART, "trainable_token_indices": [3, 3]},
     r"`trainable_token_indices`.*repeats token ids \[3\]"),
    ("trainable_token_indices", {"parts": _PART, "trainable_token_indices": {"embed": []}},
     r"`trainable_token_indices\['embed'\]`.*non-empty list"),
    ("trainable_token_indices", {"parts": _PART, "trainable_token_indices": 5}, r"`trainable_token_indices`.*list"),
]
# Set by PEFT itself, not by users: `peft_type` is always APET, the other two are bookkeeping.
UNCHECKED_CONFIG_FIELDS = {"peft_type", "auto_mapping", "peft_version"}


@pytest.mark.parametrize("field_name,kwargs,message", BAD_PART_FIELDS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_part_fields_raise_value_error_naming_the_field(field_name, kwargs, message):
    kwargs = {"operation": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        APETPart(**kwargs)
    # The same part given as a dict inside a config fails the same way.
    with pytest.raises(ValueError, match=message):
        APETConfig(parts=[kwargs], task_type="SEQ_CLS")


@pytest.mark.parametrize("field_name,kwargs,message", BAD_CONFIG_FIELDS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_config_fields_raise_value_error_naming_the_field(field_name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        APETConfig(**kwargs)


def test_every_field_has_a_bad_value_case():
    """Guards the two tables above: a new field must come with its validation case."""
    part_fields = {f.name for f in fields(APETPart)}
    config_fields = {f.name for f in fields(APETConfig)} - UNCHECKED_CONFIG_FIELDS
    assert part_fields == {name for name, _, _ in BAD_PART_FIELDS}
    assert config_fields == {name for name, _, _ in BAD_CONFIG_FIELDS}


@pytest.mark.parametrize("make,allowed", [
    (lambda: APETPart(operation="lora", rank=4), "'r'"),
    (lambda: APETConfig(parts=_PART, rank=4), "'parts'"),
    (lambda: APETConfig.lora(rank=4), "'r', 'lora_alpha'.*'seed'"),  # the preset's own and the config's
])
def test_unknown_fields_are_a_type_and_value_error_listing_the_allowed_ones(make, allowed):
    """A TypeError like PEFT's configs (PEFT's own tests rely on it) and a ValueError like every other bad field."""
    with pytest.raises(ValueError, match=rf"no fields \['rank'\]; allowed: \[.*{allowed}") as error:
        make()
    assert isinstance(error.value, TypeError)
    # PEFT's loader drops keys of a TypeError that says this; ours must not, or unknown fields would be dropped.
    assert "got an unexpected keyword argument" not in str(error.value)


def test_good_values_of_every_type_pass():
    """The checks refuse wrong types, not valid ones (ints where floats are allowed, tuples for lists...)."""
    part = APETPart(operation="lora", r=1, lora_alpha=16, lora_dropout=0, mask="adjacent", mask_axis=1, density=1,
                    mask_pairing="independent",
                    target_modules=("value", "query"), exclude_modules="x")
    assert part.target_modules == ["query", "value"] and part.density == 1
    config = APETConfig(parts=(part, {"operation": "bias"}), num_trainable_params=None, seed=0, inference_mode=True,
                        modules_to_save=("classifier",), base_model_name_or_path="x", revision="main")
    assert config.modules_to_save == ["classifier"] and config.operations == ["lora", "bias"]


# ---------------------------------------------------------------------------------- errors found on the model


def snapshot(model: nn.Module) -> dict:
    """Everything a failed `get_peft_model` must leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert not any(isinstance(m, APETLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")


def _lora_capacity(model_name: str) -> int:
    factory, task_type = MODELS[model_name]
    return count_trainable_parameters(factory(), APETConfig.lora(task_type=task_type))


PLAN_ERRORS = {
    "targets match nothing": (lambda tt: APETConfig.lora(target_modules=["no_such_module"], task_type=tt),
                              r"`target_modules`=\['no_such_module'\] matched no module.*Example module names"),
    "regex matches nothing": (lambda tt: APETConfig.adapter(target_modules=r".*\.nothing", task_type=tt),
                              r"`target_modules`=.*matched no module"),
    "everything excluded": (lambda tt: APETConfig.bitfit(target_modules="all-linear", exclude_modules="all-linear",
                                                         task_type=tt), r"leave out all of them"),
    "budget above capacity": (lambda tt: APETConfig.lora(mask="discrete", num_trainable_params=10**7, task_type=tt),
                              r"`part 'lora'.num_trainable_params` must be in \[1, \d+\]"),
    "masked part without budget": (lambda tt: APETConfig.delta(task_type=tt),
                                   r"parts \['delta'\] have a mask but no budget: set `num_trainable_params` or "
                                   r"`density`"),
    "config budget below the fixed parts": (
        lambda tt: APETConfig.combine(APETConfig.bitfit(), APETConfig.lora(mask="discrete"), num_trainable_params=5,
                                      task_type=tt),
        r"`num_trainable_params`=5 leaves -?\d+ entries .* it must be in \[\d+, \d+\]"),
    "config budget without a free masked part": (
        lambda tt: APETConfig.combine(APETConfig.bitfit(), APETConfig.lora(), num_trainable_params=100, task_type=tt),
        r"config-level `num_trainable_params`/`density` needs at least one masked part"),
    "lora on a norm": (lambda tt: APETConfig.lora(target_modules=["LayerNorm"], task_type=tt),
                       r"part 'lora' needs nn.Linear or Conv1D modules, but target .*LayerNorm"),
}


@pytest.mark.parametrize("case", sorted(PLAN_ERRORS))
def test_plan_errors_leave_the_model_untouched(case):
    factory, task_type = MODELS["bert"]
    make, message = PLAN_ERRORS[case]
    model = factory()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, make(task_type))
    assert_untouched(model, before)
    # The model still works as before.
    torch.testing.assert_close(model_output(model, model_inputs("bert")), model_output(factory(), model_inputs("bert")),
                               rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["gpt2", "llama", "t5"])
def test_budget_one_above_capacity_is_refused_and_capacity_itself_works(model_name):
    factory, task_type = MODELS[model_name]
    capacity = _lora_capacity(model_name)
    model = factory()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"num_trainable_params` must be in \[1, {capacity}\]"):
        get_peft_model(model, APETConfig.lora(mask="adjacent", num_trainable_params=capacity + 1, task_type=task_type))
    assert_untouched(model, before)
    model = get_peft_model(model, APETConfig.lora(mask="adjacent", num_trainable_params=capacity, task_type=task_type))
    assert model.get_nb_trainable_parameters()[0] == capacity


def test_a_model_type_without_defaults_needs_target_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no default `target_modules` for operation 'lora'.*known: \[.*'bert'"):
        get_peft_model(model, APETConfig.lora())
    assert_untouched(model, before)


def test_exclude_modules_understands_the_special_sets():
    """`exclude_modules` has the syntax of `target_modules`, "all-linear" included (it used to be taken as a regex
    that matched nothing, so nothing was excluded)."""
    factory, task_type = MODELS["bert"]
    model = get_peft_model(factory(), APETConfig.bitfit(exclude_modules="all-linear", task_type=task_type))
    wrapped = [type(m.get_base_layer()) for m in model.modules() if isinstance(m, APETLayer)]
    assert wrapped and set(wrapped) == {nn.LayerNorm}


@pytest.mark.parametrize("make,message", [
    (lambda: APETConfig.lora(mask_strategy="magnitude"), r"part 'lora': mask_strategy='magnitude' is a setting of"),
    (lambda: APETConfig.bitfit(mask_axis=1), r"the bias preset does not take `mask_axis`"),
    (lambda: APETConfig.prompt(target_modules=["query"]), r"the prompt preset does not take `target_modules`"),
])
def test_a_preset_names_the_part_that_a_misplaced_argument_belongs_to(make, message):
    """A part field given to a preset that does not take it: the parts' own message, not an unknown config field."""
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("exclude", [["query"], ".*"])
def test_targets_all_excluded_name_exclude_modules(exclude):
    with pytest.raises(ValueError, match=r"matches \[.*query.*\], but `exclude_modules`=.*leave out all of them"):
        get_peft_model(tiny_bert(), APETConfig.lora(target_modules=["query"], exclude_modules=exclude,
                                                    task_type="SEQ_CLS"))


def test_a_bias_part_refuses_a_mask_axis():
    from peft_apet.parts import BiasPart

    with pytest.raises(ValueError, match=r"`mask_axis`=1, but a bias vector is one line"):
        BiasPart(mask="adjacent", mask_axis=1, num_trainable_params=10)
    assert BiasPart(mask="adjacent", num_trainable_params=10).mask_axis == 0
