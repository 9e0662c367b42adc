"""APETConfig: PEFT conventions, presets, JSON round trip, errors that name the field."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from peft import PeftConfig

from peft_apet import APETConfig, APETPart


def test_every_field_has_help():
    for cls in (APETConfig, APETPart):
        missing = [f.name for f in fields(cls) if not f.metadata.get("help")]
        assert not missing, f"{cls.__name__} fields without help: {missing}"


@pytest.mark.parametrize(
    "config",
    [
        APETConfig.lora(r=4, lora_alpha=16, target_modules=["query"], mask="discrete", num_trainable_params=7),
        APETConfig.adapter(bottleneck=3, activation="gelu", mask="adjacent", mask_axis=1, density=0.5,
                           mask_pairing="independent"),
        APETConfig.bitfit(),
        APETConfig.delta(num_trainable_params=11, mask="adjacent"),
        APETConfig.prompt(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        APETConfig.combine(APETConfig.lora(mask="discrete"), APETConfig.bitfit(), num_trainable_params=99, seed=3),
    ],
)
def test_config_json_round_trip(config, tmp_path):
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "APET"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, APETConfig)
    assert loaded.to_dict() == config.to_dict()


def test_presets_fill_operation_defaults():
    part = APETConfig.lora().parts[0]
    assert (part.operation, part.r, part.lora_alpha, part.lora_dropout, part.mask) == ("lora", 8, 8.0, 0.0, None)
    assert APETConfig.adapter().parts[0].bottleneck == 24
    assert APETConfig.delta(num_trainable_params=3).parts[0].mask == "discrete"
    assert APETConfig.combine(APETConfig.lora(), APETConfig.bitfit()).operations == ["lora", "bias"]


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: APETPart(operation="prefix"), "operation"),
        (lambda: APETPart(operation="lora", mask="random"), "mask"),
        (lambda: APETPart(operation="lora", mask="adjacent", mask_axis=2, density=0.1), "mask_axis"),
        (lambda: APETPart(operation="bias", r=4), "`r`"),
        (lambda: APETPart(operation="lora", r=0), "`r`"),
        (lambda: APETPart(operation="lora", num_trainable_params=10), "mask"),
        (lambda: APETPart(operation="lora", mask="discrete", num_trainable_params=0), "num_trainable_params"),
        (lambda: APETPart(operation="lora", mask="discrete", num_trainable_params=2.5), "num_trainable_params"),
        (lambda: APETPart(operation="lora", mask="discrete", density=1.5), "density"),
        (lambda: APETPart(operation="lora", mask="discrete", density=0.1, num_trainable_params=3), "not both"),
        (lambda: APETPart(operation="lora", target_modules=[]), "target_modules"),
        (lambda: APETPart(operation="adapter", activation="swish"), "activation"),
        (lambda: APETPart(operation="prompt", prompt_init="text"), "prompt_init_text"),
        (lambda: APETConfig(parts=[]), "parts"),
        (lambda: APETConfig(parts=[{"operation": "lora", "rank": 4}]), "rank"),
        (lambda: APETConfig.combine(APETConfig.lora(), APETConfig.lora(r=2)), "duplicated"),
        (lambda: APETConfig.lora(num_trainable_params=-3), "num_trainable_params"),
        (lambda: APETConfig.lora(seed=-1), "seed"),
        (lambda: APETConfig.prompt(), "task_type"),
        (lambda: APETConfig.lora(task_type="TRANSLATION"), "task_type"),
    ],
)
def test_bad_fields_raise_value_error_naming_them(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_unknown_fields_from_a_newer_version_are_refused(tmp_path):
    config = APETConfig.lora()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["future_option"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="future_option"):
        PeftConfig.from_pretrained(tmp_path)


def test_combine_refuses_config_level_settings_of_its_configs():
    """combine takes the config-level settings (seed, scope, heads, token rows, task type) from its own arguments:
    one set on a combined config and not passed again would be dropped silently, so it is refused, naming it."""
    inner = APETConfig.delta(mask="discrete", num_trainable_params=50, seed=7, selection_scope="global",
                             mask_strategy="magnitude", modules_to_save=["pooler"])
    with pytest.raises(ValueError, match=r"config 0 sets seed=7, modules_to_save=\['pooler'\], selection_scope="):
        APETConfig.combine(inner, APETConfig.bitfit())
    combined = APETConfig.combine(inner, APETConfig.bitfit(), seed=7, selection_scope="global",
                                  modules_to_save=["pooler"])
    assert combined.seed == 7 and combined.selection_scope == "global"
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS'"):
        APETConfig.combine(APETConfig.lora(task_type="SEQ_CLS"), APETConfig.bitfit())
    assert APETConfig.combine(APETConfig.lora(task_type="SEQ_CLS"), APETConfig.bitfit(),
                              task_type="SEQ_CLS").task_type == "SEQ_CLS"
