"""Damaged or mismatched checkpoints, broken adapters and reproducible files.

A checkpoint that does not fit the model (another base model, a damaged file, a config from a newer version) is a
clear error naming the module or the file, and the model is left as it was: no APET layer in a base model, no
half-created adapter next to existing ones, no value copied. `merge_adapter(safe_merge=True)` with a NaN changes no
base weight. Saving is reproducible: save -> load -> save writes the same bytes, masks are the same in every
process, and adapter weights are read through safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MODELS, VOCAB, model_inputs, model_output, tiny_bert, write_per_module
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from peft_apet import APETConfig, APETLayer

WEIGHTS = "adapter_model.safetensors"


def bert(hidden: int = 32, layers: int = 2) -> BertForSequenceClassification:
    """`conftest.tiny_bert` with other sizes: a different base model for the same adapter config."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64)).eval()


def lora(**kwargs) -> APETConfig:
    return APETConfig.lora(task_type="SEQ_CLS", init_weights=False, **kwargs)


def save_adapter(path, config: APETConfig, base=None):
    model = get_peft_model(base if base is not None else tiny_bert(), config).eval()
    model.save_pretrained(path)
    return model


def snapshot(model: torch.nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modules": [(n, type(m)) for n, m in model.named_modules()],
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so a NaN equals itself, unlike `torch.equal`)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in after["state"].items() if not bit_identical(before["state"][k], v)]
    assert not changed, changed


# Checkpoints of tiny_bert (hidden 32, 2 layers) loaded onto other base models, and what the error names: a packed
# file (`peft_apet.packing`, what save_pretrained writes) holds totals and a layout checksum, a file of peft-apet 0.1
# one values and one index tensor per module.
PACKED, PER_MODULE = "packed", "0.1 (per module)"
OTHER_BASE_MODELS = {
    "wider (shape mismatch)": (lambda: bert(hidden=64), {}, {
        PER_MODULE: r"layer\.0\.attention\.self\.query \(lora_A\): values of shape \(256,\) in the checkpoint, "
                    r"\(512,\)",
        PACKED: r"2048 values in the file, 4096 in this model's adapter"}),
    "deeper (missing modules)": (lambda: bert(layers=3), {}, {
        PER_MODULE: r"no tensors for modules \['bert\.encoder\.layer\.2\.",
        PACKED: r"it holds 8 APET tensors, this model's adapter has 12; 2048 values in the file, 3072"}),
    "shallower (extra modules)": (lambda: bert(layers=1), {}, {
        PER_MODULE: r"modules this model's adapter does not have: \['bert\.encoder\.layer\.1\.",
        PACKED: r"it holds 8 APET tensors, this model's adapter has 4; 2048 values in the file, 1024"}),
    # Same budget on a narrower model: same number of values, but the coded mask is for larger tensors.
    "narrower, same budget": (lambda: bert(hidden=16), {"mask": "discrete", "num_trainable_params": 200}, {
        PER_MODULE: r"query \(lora_A\): encoded mask index of \d+ bytes, expected \d+ for \d+ entries of a tensor of "
                    r"128 \(damaged, or saved for another tensor or budget\)",
        PACKED: r"a mask index of 143 bytes in the file, 117 for the masks of this model's adapter"}),
}


def save_in_form(path, config: APETConfig, form: str):
    model = save_adapter(path, config)
    if form == PER_MODULE:
        write_per_module(model, path)
    return model


@pytest.mark.parametrize("form", [PACKED, PER_MODULE])
@pytest.mark.parametrize("case", sorted(OTHER_BASE_MODELS))
def test_from_pretrained_onto_another_base_model_is_refused_and_leaves_it_unchanged(tmp_path, case, form):
    make_base, kwargs, messages = OTHER_BASE_MODELS[case]
    save_in_form(tmp_path / "adapter", lora(**kwargs), form)
    base = make_base()
    before = snapshot(base)
    with pytest.raises(ValueError, match=messages[form]):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_unchanged(base, before)
    assert not any(isinstance(m, APETLayer) for m in base.modules())


@pytest.mark.parametrize("case", ["wider (shape mismatch)", "narrower, same budget"])
def test_from_pretrained_with_a_config_onto_another_base_model_leaves_it_unchanged(tmp_path, case):
    """With `config=` PEFT injects the adapter before reading the weights: the refused load must still leave the
    caller's model as it was (no empty APET layers, no frozen parameters)."""
    make_base, kwargs, _ = OTHER_BASE_MODELS[case]
    save_adapter(tmp_path / "adapter", lora(**kwargs))
    base = make_base()
    inputs = model_inputs("bert")
    expected = model_output(base, inputs)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"loaded into adapter 'default' does not fit"):
        PeftModel.from_pretrained(base, tmp_path / "adapter", config=lora(**kwargs))
    assert_unchanged(base, before)
    assert not any(isinstance(m, APETLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert torch.equal(model_output(base, inputs), expected)
    # ... and the model is still usable for a load that fits.
    assert isinstance(get_peft_model(base, lora(**kwargs)), PeftModel)


def test_a_pickle_checkpoint_goes_through_the_same_checks(tmp_path):
    """`save_pretrained(safe_serialization=False)` writes adapter_model.bin: it loads (read weights-only), and a
    mismatched or unsafe one is refused naming the file before anything is injected."""
    trained = get_peft_model(tiny_bert(), lora(mask="discrete", num_trainable_params=200)).eval()
    trained.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter" / WEIGHTS).exists()
    inputs = model_inputs("bert")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    assert torch.equal(model_output(loaded, inputs), model_output(trained, inputs))

    base = bert(hidden=16)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*a mask index of \d+ bytes in the file"):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_unchanged(base, before)

    class Payload:  # a pickle that would run code on load: weights_only refuses it
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Payload()}, tmp_path / "adapter" / "adapter_model.bin")
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read as a weights-only"):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_unchanged(base, before)


@pytest.mark.parametrize("form", [PACKED, PER_MODULE])
@pytest.mark.parametrize("case", sorted(OTHER_BASE_MODELS))
def test_load_adapter_of_another_base_model_keeps_the_existing_adapters(tmp_path, case, form):
    make_base, kwargs, messages = OTHER_BASE_MODELS[case]
    save_in_form(tmp_path / "adapter", lora(**kwargs), form)
    model = get_peft_model(make_base(), APETConfig.bitfit(task_type="SEQ_CLS", init_weights=False))
    inputs = model_inputs("bert")
    expected = model_output(model, inputs)
    before = snapshot(model)
    with pytest.raises(ValueError, match=messages[form]):
        model.load_adapter(tmp_path / "adapter", adapter_name="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    assert not any(isinstance(m, APETLayer) and "other" in m.apet_weights for m in model.modules())
    assert torch.equal(model_output(model, inputs), expected)


@pytest.mark.parametrize("form,names", [(PACKED, r"values in the file"), (PER_MODULE, r"query \(lora_A\)")])
def test_reloading_into_an_existing_adapter_checks_before_copying(tmp_path, form, names):
    """`load_adapter` under a name that exists skips creating the adapter: the state dict itself is checked."""
    save_in_form(tmp_path / "adapter", lora(), form)
    model = get_peft_model(bert(hidden=64), lora())
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"loaded into adapter 'default' does not fit.*{names}"):
        model.load_adapter(tmp_path / "adapter", adapter_name="default")
    assert_unchanged(model, before)


def test_a_matching_checkpoint_still_loads(tmp_path):
    """The checks above refuse mismatches only: the same base model loads with identical outputs."""
    trained = save_adapter(tmp_path / "adapter", lora(mask="discrete", num_trainable_params=200))
    inputs = model_inputs("bert")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    assert torch.equal(model_output(loaded, inputs), model_output(trained, inputs))
    other = get_peft_model(tiny_bert(), APETConfig.bitfit(task_type="SEQ_CLS"))
    other.load_adapter(tmp_path / "adapter", adapter_name="trained")
    other.set_adapter("trained")
    assert torch.equal(model_output(other, inputs), model_output(trained, inputs))


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 40])
    elif how == "corrupted header":
        path.write_bytes(data[:8] + b"{not json" + data[17:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not safetensors":
        path.write_bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    elif how == "missing":
        path.unlink()


DAMAGES = ["truncated", "corrupted header", "empty", "not safetensors", "missing"]


def _damage_error(how: str, folder) -> tuple[type[Exception], str]:
    if how == "missing":
        return FileNotFoundError, rf"{folder}.* no {WEIGHTS}"
    return ValueError, rf"{folder / WEIGHTS} is damaged and cannot be read"


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_weights_file_is_named_and_nothing_is_injected(tmp_path, how):
    save_adapter(tmp_path / "adapter", lora())
    _damage(tmp_path / "adapter" / WEIGHTS, how)
    error, message = _damage_error(how, tmp_path / "adapter")

    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(error, match=message):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_unchanged(base, before)

    model = get_peft_model(tiny_bert(), APETConfig.bitfit(task_type="SEQ_CLS", init_weights=False))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.load_adapter(tmp_path / "adapter", adapter_name="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes,message", [
    ({"future_option": True}, r"no fields \['future_option'\].*newer peft-apet"),
    ({"parts": [{"operation": "lora", "future_part_option": 1}]}, r"APETPart has no fields \['future_part_option'\]"),
    ({"seed": -1}, r"`seed` must be a non-negative int"),
])
def test_a_config_from_a_newer_version_is_refused_by_every_loader(tmp_path, changes, message):
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    save_adapter(tmp_path / "adapter", lora(), base=BertForSequenceClassification.from_pretrained(base_dir))
    _edit_config(tmp_path / "adapter", **changes)
    config_file = tmp_path / "adapter" / "adapter_config.json"

    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=message):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(ValueError, match=rf"{config_file}: .*{message}"):
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_unchanged(base, before)
    model = get_peft_model(tiny_bert(), APETConfig.bitfit(task_type="SEQ_CLS"))
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{config_file}: .*{message}"):
        model.load_adapter(tmp_path / "adapter", adapter_name="other")
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------- safe merge


def _poison_last_layer(model, value: float) -> str:
    """Put `value` into one entry of the last APET layer's tensors; returns that layer's name."""
    name, layer = [(n, m) for n, m in model.named_modules() if isinstance(m, APETLayer)][-1]
    with torch.no_grad():
        next(iter(layer.apet_weights["default"].values())).values[0] = value
    return name


@pytest.mark.parametrize("model_name,config", [
    ("bert", APETConfig.delta(mask="discrete", num_trainable_params=300)),
    ("bert", APETConfig.lora(mask="adjacent", num_trainable_params=300)),
    ("llama", APETConfig.bitfit()),  # bias-free projections: merging would create new bias vectors
    ("gpt2", APETConfig.combine(APETConfig.lora(), APETConfig.bitfit(), APETConfig.delta(mask=None))),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_safe_merge_of_a_broken_adapter_changes_no_base_weight(model_name, config, value):
    factory, task_type = MODELS[model_name]
    config.task_type, config.init_weights = task_type, False
    model = get_peft_model(factory(), config).eval()
    broken = _poison_last_layer(model, value)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"NaNs or infs .*{broken.removeprefix('base_model.model.')}"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)
    assert not any(m.merged for m in model.modules() if isinstance(m, APETLayer))
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)


def test_safe_merge_of_a_healthy_adapter_matches_the_plain_merge():
    factory, task_type = MODELS["gpt2"]
    config = APETConfig.combine(APETConfig.lora(), APETConfig.bitfit(), APETConfig.delta(mask="discrete"),
                                num_trainable_params=4000, task_type=task_type, init_weights=False)
    plain, safe = get_peft_model(factory(), config).eval(), get_peft_model(factory(), config).eval()
    plain.merge_adapter()
    safe.merge_adapter(safe_merge=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), safe.state_dict().values()))


# ---------------------------------------------------------------------------------- reproducible files


def unified(task_type: str) -> APETConfig:
    return APETConfig.combine(APETConfig.lora(mask="adjacent"), APETConfig.adapter(mask="discrete", mask_axis=1),
                              APETConfig.bitfit(), APETConfig.delta(mask="discrete"), num_trainable_params=6000,
                              task_type=task_type, init_weights=False, seed=7)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_save_load_save_writes_identical_bytes(tmp_path, model_name):
    factory, task_type = MODELS[model_name]
    get_peft_model(factory(), unified(task_type)).save_pretrained(tmp_path / "first")
    PeftModel.from_pretrained(factory(), tmp_path / "first").save_pretrained(tmp_path / "second")
    for name in (WEIGHTS, "adapter_config.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def mask_config(seed: int) -> APETConfig:
    return APETConfig.combine(APETConfig.lora(mask="adjacent"), APETConfig.delta(mask="discrete"),
                              num_trainable_params=3001, task_type="CAUSAL_LM", seed=seed)


MASK_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_llama
    from peft import get_peft_model
    from test_loading_errors import mask_config
    for seed, out in zip(sys.argv[2::2], sys.argv[3::2]):
        get_peft_model(tiny_llama(), mask_config(int(seed))).save_pretrained(out)
    """
)


def test_masks_are_the_same_in_every_process(tmp_path):
    """Seeds come from a stable hash of the module name, never the per-process salted `hash()`."""
    get_peft_model(MODELS["llama"][0](), mask_config(5)).save_pretrained(tmp_path / "here")
    (tmp_path / "worker.py").write_text(MASK_WORKER)
    subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(Path(__file__).parent),
                    "5", str(tmp_path / "there"), "6", str(tmp_path / "other-seed")],
                   check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    masks = {run: {k: v for k, v in load_file(tmp_path / run / WEIGHTS).items() if k.endswith(".index")}
             for run in ("here", "there", "other-seed")}
    assert masks["here"].keys() == masks["there"].keys() and len(masks["here"]) > 0
    assert all(torch.equal(masks["here"][k], masks["there"][k]) for k in masks["here"])
    assert any(not torch.equal(masks["here"][k], masks["other-seed"][k]) for k in masks["here"])  # seeds matter


def test_adapter_weights_are_read_with_safetensors_only(tmp_path, monkeypatch):
    trained = save_adapter(tmp_path / "adapter", lora(mask="discrete", num_trainable_params=99))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called while loading an APET adapter")

    monkeypatch.setattr(torch, "load", refuse)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    loaded.load_adapter(tmp_path / "adapter", adapter_name="again")
    inputs = model_inputs("bert")
    assert torch.equal(model_output(loaded, inputs), model_output(trained, inputs))
    # The patch is live: a pickle checkpoint would have gone through it.
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter_config.json")
    with pytest.raises(AssertionError, match="torch.load was called"):
        torch.load(tmp_path / "adapter_config.json")


def test_a_failed_load_adapter_of_a_new_adapter_leaves_the_model_as_it_was(tmp_path):
    """A checkpoint without its `modules_to_save` head fails inside PEFT after the new adapter was injected: it is
    taken out again (layers, config, head copy, `requires_grad` flags), so a later save cannot write it."""
    save_adapter(tmp_path / "a", lora(r=4))
    save_adapter(tmp_path / "b", lora(r=4))
    tensors = load_file(tmp_path / "b" / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, tmp_path / "b" / WEIGHTS,
              metadata={"format": "pt"})
    model = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a").eval()
    before, output = snapshot(model), model_output(model, model_inputs("bert"))
    with pytest.raises(KeyError, match="classifier"):
        model.load_adapter(tmp_path / "b", "other")
    after = snapshot(model)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert after["modules"] == before["modules"] and after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert torch.equal(model_output(model, model_inputs("bert")), output)
    model.save_pretrained(tmp_path / "c")
    assert not (tmp_path / "c" / "other").exists()


def test_a_folder_with_both_weight_files_says_which_is_loaded(tmp_path):
    """A later `save_pretrained(safe_serialization=False)` into the same folder leaves the earlier safetensors
    file, which PEFT loads: the load warns, naming both and the newer."""
    model = save_adapter(tmp_path, lora(r=4))
    for weights in model.base_model.model.modules():
        if isinstance(weights, APETLayer):
            for masked in weights.apet_weights["default"].values():
                masked.values.data += 1.0
    os.utime(tmp_path / WEIGHTS, (1, 1))  # the first save, older
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.warns(UserWarning, match=r"both adapter_model.safetensors and adapter_model.bin \(the newer is "
                                         r"adapter_model.bin\)"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_transformers_own_load_adapter_is_refused_before_the_model_changes(tmp_path):
    """transformers' `load_adapter` loads weights past PEFT's loader: on an APET folder it left every tensor at its
    initial value (and took a truncated file). Refused, pointing to PeftModel.from_pretrained."""
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), APETConfig.delta(num_trainable_params=300, task_type="CAUSAL_LM",
                                                          init_weights=False))
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"transformers' `model.load_adapter\(...\)`.*PeftModel.from_pretrained"):
        base.load_adapter(str(tmp_path))
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(isinstance(m, APETLayer) for m in base.modules())


def test_loading_values_into_a_merged_adapter_is_refused(tmp_path):
    """The masks and values would change under the merged delta, and unmerging would then subtract the new one from
    the base weights: refused until the adapter is unmerged."""
    model = get_peft_model(tiny_bert(), APETConfig.delta(num_trainable_params=300, task_type="SEQ_CLS",
                                                         init_weights=False))
    model.save_pretrained(tmp_path / "a")
    other = get_peft_model(tiny_bert(), APETConfig.delta(num_trainable_params=300, task_type="SEQ_CLS", seed=1,
                                                         init_weights=False))
    other.save_pretrained(tmp_path / "b")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"adapter 'default' is merged into the base weights.*No value was loaded"):
        model.load_adapter(tmp_path / "b", adapter_name="default")
    model.unmerge_adapter()
    originals = dict(tiny_bert().named_modules())
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, APETLayer):
            torch.testing.assert_close(module.get_base_layer().weight, originals[name].weight, rtol=0, atol=1e-6)
