"""A config class per operation: `APETPart(operation=...)` builds it, fields of other operations are refused or
dropped, `adapter_config.json` keeps peft-apet 0.1's format, and the presets are built from the part classes."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, fields

import pytest
from peft import PeftConfig

from peft_apet import AdapterPart, APETConfig, APETPart, BiasPart, DeltaPart, LoraPart, PromptPart
from peft_apet.operations import PAIRED_OPERATIONS, SCORED_OPERATIONS
from peft_apet.parts import (
    PART_CLASSES,
    SAVED_FIELDS,
    SAVED_IF_SET,
    PairedPart,
    ScoredPart,
    UnknownFieldError,
)

# One part of every class, with settings of its own and of its mixin.
PARTS = [
    PromptPart(num_virtual_tokens=4, mask="adjacent", num_trainable_params=8),
    LoraPart(r=4, lora_alpha=16.0, target_modules=["query"], mask="discrete", density=0.5,
             mask_pairing="independent"),
    AdapterPart(bottleneck=3, activation="gelu", mask="adjacent", num_trainable_params=5),
    BiasPart(mask="discrete", num_trainable_params=7, mask_strategy="magnitude"),
    DeltaPart(mask="discrete", density=0.1, mask_strategy="sam", mask_strategy_kwargs={"damping": 0.5},
              exclude_modules="all-linear"),
]
TASK_TYPE = {"prompt": "CAUSAL_LM"}


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.operation)
def test_every_part_round_trips_through_its_saved_form(part):
    saved = part.to_dict()
    assert list(saved) == list(SAVED_FIELDS)
    assert json.loads(json.dumps(saved)) == saved
    assert APETPart(**saved) == part
    assert APETPart(**asdict(part)) == part and type(part)(**asdict(part)) == part


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.operation)
def test_every_part_round_trips_through_save_pretrained(part, tmp_path):
    config = APETConfig(parts=[part], task_type=TASK_TYPE.get(part.operation))
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded.parts == [part] and type(loaded.parts[0]) is type(part)
    assert loaded.to_dict() == config.to_dict()
    assert APETConfig.from_peft_type(**config.to_dict()).parts == [part]


def test_saved_parts_hold_every_field_as_peft_apet_0_1_wrote_it():
    """Fields a part does not have are null, except `mask_pairing` / `mask_strategy`, which 0.1 gave every part."""
    saved = APETConfig.combine(APETConfig.bitfit(), APETConfig.lora()).to_dict()["parts"]
    bias, lora = saved
    assert (bias["r"], bias["bottleneck"], bias["mask_pairing"], bias["mask_strategy"]) == (None, None, "aligned",
                                                                                            "random")
    assert (lora["r"], lora["mask_strategy"], lora["mask_strategy_kwargs"], lora["num_virtual_tokens"]) == (
        8, "random", None, None)
    assert [f.name for f in fields(APETPart)] == [*SAVED_FIELDS, *SAVED_IF_SET]  # fields added after 0.1 come last


@pytest.mark.parametrize("operation,part_class", [
    ("prompt", PromptPart), ("lora", LoraPart), ("adapter", AdapterPart), ("bias", BiasPart), ("delta", DeltaPart),
])
def test_apet_part_builds_the_class_of_its_operation(operation, part_class):
    part = APETPart(operation=operation)
    assert type(part) is part_class and part == part_class()
    assert isinstance(part, APETPart) and issubclass(part_class, APETPart)
    assert PART_CLASSES[operation] is part_class
    assert type(APETPart()) is LoraPart  # the default operation, as in 0.1


def test_apet_part_takes_fields_by_position_in_the_saved_order():
    assert APETPart("lora", ["query"], None, "discrete") == LoraPart(target_modules=["query"], mask="discrete")


@pytest.mark.parametrize("kwargs,message", [
    ({"operation": "bias", "r": 4}, r"part 'bias': `r` is only used by operation 'lora' \(got r=4\)"),
    ({"operation": "prompt", "bottleneck": 2}, r"part 'prompt': `bottleneck` is only used by operation 'adapter'"),
    ({"operation": "delta", "mask_pairing": "paired"},
     r"part 'delta': `mask_pairing` is only used by operations \['lora', 'adapter'\]"),
    ({"operation": "adapter", "mask_strategy_kwargs": {"damping": 1.0}},
     r"part 'adapter': mask_strategy_kwargs=\{'damping': 1.0\} is a setting of \['delta', 'bias'\] parts"),
    ({"operation": "lora", "prompt_init_text": "Hello"}, r"`prompt_init_text` is only used by operation 'prompt'"),
])
def test_a_setting_of_another_operation_is_refused_naming_field_operation_and_owners(kwargs, message):
    with pytest.raises(ValueError, match=message):
        APETPart(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"operation": "bias", "r": None, "lora_alpha": None, "bottleneck": None, "num_virtual_tokens": None},
    # what 0.1 wrote on every part, and "independent" on a 0.1 part read by `check_kwargs` and saved again
    {"operation": "bias", "mask_pairing": "aligned"},
    {"operation": "delta", "mask_pairing": "independent"},
    {"operation": "lora", "mask_strategy": "random", "mask_strategy_kwargs": None},
])
def test_fields_of_other_operations_without_a_setting_are_dropped(kwargs):
    part = APETPart(**kwargs)
    assert part == PART_CLASSES[kwargs["operation"]]()


def test_part_classes_refuse_unknown_fields_and_another_operation():
    with pytest.raises(UnknownFieldError, match=r"LoraPart has no fields \['bottleneck'\]; allowed: \['operation', "):
        LoraPart(bottleneck=3)
    with pytest.raises(ValueError, match=r"`operation` must be one of \['lora'\], got 'bias'"):
        LoraPart(operation="bias")


def test_generic_reads_work_on_every_part():
    """Code that walks all parts reads `mask_strategy`: parts that cannot be scored draw their masks at random."""
    assert [p.mask_strategy for p in PARTS] == ["random", "random", "random", "magnitude", "sam"]
    with pytest.raises(AttributeError):
        PARTS[1].mask_strategy = "sam"
    assert [p.mergeable for p in PARTS] == [False, True, False, True, True]


def test_mixins_agree_with_the_operation_tables():
    assert PAIRED_OPERATIONS == tuple(op for op, c in PART_CLASSES.items() if issubclass(c, PairedPart))
    assert set(SCORED_OPERATIONS) == {op for op, c in PART_CLASSES.items() if issubclass(c, ScoredPart)}


@pytest.mark.parametrize("preset,part", [
    (lambda: APETConfig.prompt(num_virtual_tokens=5, task_type="SEQ_CLS"), PromptPart(num_virtual_tokens=5)),
    (lambda: APETConfig.lora(4, 16, mask="discrete", density=0.5),
     LoraPart(r=4, lora_alpha=16.0, mask="discrete", density=0.5)),
    (lambda: APETConfig.adapter(bottleneck=6, mask_pairing="independent"),
     AdapterPart(bottleneck=6, mask_pairing="independent")),
    (lambda: APETConfig.bitfit(mask="discrete", num_trainable_params=3, mask_strategy="magnitude"),
     BiasPart(mask="discrete", num_trainable_params=3, mask_strategy="magnitude")),
    (lambda: APETConfig.delta(density=0.2), DeltaPart(mask="discrete", density=0.2)),
])
def test_presets_build_the_part_built_by_hand(preset, part):
    config = preset()
    assert config.parts == [part]
    assert config.to_dict() == APETConfig(parts=[part], task_type=config.task_type).to_dict()


def test_lora_preset_stores_floats_as_0_1_did():
    part = APETConfig.lora(lora_alpha=16, lora_dropout=0).parts[0]
    assert (type(part.lora_alpha), type(part.lora_dropout)) == (float, float)


# The presets' signatures of peft-apet 0.1, with later fields appended (`delta_dropout`): every call that worked
# then works now.
PRESET_SIGNATURES = {
    "prompt": "(num_virtual_tokens=20, prompt_init='random', prompt_init_text=None, tokenizer_name_or_path=None, "
              "mask=None, mask_axis=0, num_trainable_params=None, density=None, **config_kwargs)",
    "lora": "(r=8, lora_alpha=8.0, lora_dropout=0.0, target_modules=None, mask=None, mask_axis=0, "
            "num_trainable_params=None, density=None, exclude_modules=None, mask_pairing='aligned', **config_kwargs)",
    "adapter": "(bottleneck=24, activation='relu', target_modules=None, mask=None, mask_axis=0, "
               "num_trainable_params=None, density=None, exclude_modules=None, mask_pairing='aligned', "
               "**config_kwargs)",
    "bitfit": "(target_modules=None, mask=None, num_trainable_params=None, density=None, exclude_modules=None, "
              "mask_strategy='random', mask_strategy_kwargs=None, delta_dropout=0.0, **config_kwargs)",
    "delta": "(target_modules=None, mask='discrete', mask_axis=0, num_trainable_params=None, density=None, "
             "exclude_modules=None, mask_strategy='random', mask_strategy_kwargs=None, delta_dropout=0.0, "
             "**config_kwargs)",
}


@pytest.mark.parametrize("name", sorted(PRESET_SIGNATURES))
def test_presets_show_their_signature_and_arguments(name):
    preset = getattr(APETConfig, name)
    signature = inspect.signature(preset)
    plain = signature.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                          for p in signature.parameters.values()],
                              return_annotation=inspect.Signature.empty)
    assert str(plain) == PRESET_SIGNATURES[name]
    assert preset.__name__ == name and "Args:" in preset.__doc__
    assert all(f"    {p}: " in preset.__doc__ for p in signature.parameters if p != "config_kwargs")


def test_public_classes_document_their_arguments():
    for obj in (APETConfig, APETPart, APETConfig.combine, *PART_CLASSES.values()):
        assert "Args:" in obj.__doc__, obj
    assert "    selection_scope: " in APETConfig.__doc__ and "    r: " in LoraPart.__doc__


def test_combine_copies_the_parts():
    lora = APETConfig.lora(target_modules=["query"])
    combined = APETConfig.combine(lora, APETConfig.bitfit())
    assert combined.parts[0] == lora.parts[0] and combined.parts[0] is not lora.parts[0]
    combined.parts[0].target_modules.append("value")
    assert lora.parts[0].target_modules == ["query"]
