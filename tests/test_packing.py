"""Packed adapter files (`peft_apet.packing`): the documented layout, exact round trips on every path a state dict
takes (save_pretrained, load_adapter with low_cpu_mem_usage, get/set_peft_model_state_dict, several adapters, meta
models), and refusals of files that do not fit before anything is copied."""

from __future__ import annotations

import math
import struct
import zlib
from types import SimpleNamespace

import pytest
import torch
from conftest import model_inputs, model_output, tiny_bert, tiny_llama
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_apet import APETConfig, APETLayer
from peft_apet.index_codec import encode_indices
from peft_apet.packing import INDEX_KEY, VALUES_KEY, index_size, layout_text, pack, unpack

WEIGHTS = "adapter_model.safetensors"


def spec(shape, mask, k, axis=0):
    return SimpleNamespace(shape=tuple(shape), mask=mask, axis=axis, num_entries=k)


def unified(**kwargs) -> APETConfig:
    return APETConfig.combine(APETConfig.lora(mask="adjacent"), APETConfig.adapter(mask="discrete", mask_axis=1),
                              APETConfig.bitfit(), APETConfig.delta(mask="discrete"), num_trainable_params=3000,
                              task_type="SEQ_CLS", init_weights=False, **kwargs)


def apet_tensors(model, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"{name}.{role}": (w.values.detach().clone(), w.index.clone()) for name, m in model.named_modules()
            if isinstance(m, APETLayer) and adapter_name in m.apet_weights
            for role, w in m.apet_weights[adapter_name].items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key, (values, index) in a.items():
        assert torch.equal(b[key][0], values) and torch.equal(b[key][1], index), key


# ---------------------------------------------------------------------------------------------- the format itself
def test_pack_then_unpack_is_exact_for_every_mask_and_beyond_int32_universes():
    g = torch.Generator().manual_seed(0)
    huge = (2**20, 2**12)  # 2^32 entries: positions in the packed universe do not fit int32
    specs = {("a", "delta"): spec(huge, "discrete", 50), ("b", "delta"): spec((6, 8), "discrete", 0),
             ("c", "delta"): spec((6, 8), "discrete", 48), ("d", "delta"): spec(huge, "discrete", 7),
             ("a", "lora_A"): spec((4, 8), "adjacent", 11, axis=1), ("b", "lora_A"): spec((4, 8), "adjacent", 8),
             ("e", "bias"): spec((5,), None, 5)}
    state = {}
    for (module, role), s in specs.items():
        n = math.prod(s.shape)
        if s.mask == "discrete":
            index = (torch.randperm(n, generator=g)[:s.num_entries].sort().values.int() if n < 2**31 else
                     torch.arange(s.num_entries, dtype=torch.int32) * 1000 + 7)
        elif s.mask == "adjacent":
            lines = s.shape[1] if s.axis else s.shape[0]
            length = n // lines
            index = torch.randperm(lines, generator=g)[:math.ceil(s.num_entries / length)].sort().values.int()
        else:
            index = torch.empty(0, dtype=torch.int32)
        state[(module, role)] = (s, torch.randn(s.num_entries, generator=g), index)
    packed = pack(state)
    assert sorted(packed) == [INDEX_KEY, VALUES_KEY]
    layout = {key: (s, s.num_entries) for key, s in specs.items()}
    order = sorted(specs, key=lambda key: (key[1], key[0]))  # by role, then module
    assert torch.equal(packed[VALUES_KEY], torch.cat([state[key][1] for key in order]))
    # the head: version 1, 7 tensors, CRC-32 of the layout text; then per masked role (delta, lora_A) one code
    head = struct.pack("<BII", 1, 7, zlib.crc32(layout_text(layout).encode()))
    assert bytes(packed[INDEX_KEY][:9].tolist()) == head
    delta = torch.cat([state[("a", "delta")][2].long(), state[("c", "delta")][2].long() + 2**32 + 48,
                       state[("d", "delta")][2].long() + 2**32 + 96])  # b (6 x 8) has no entry
    lora = torch.cat([state[("a", "lora_A")][2].long(), state[("b", "lora_A")][2].long() + 8])
    expected = torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8), encode_indices(delta, 2**33 + 96),
                          encode_indices(lora, 8 + 4)])
    assert torch.equal(packed[INDEX_KEY], expected) and packed[INDEX_KEY].numel() == index_size(layout)
    out = unpack({**packed, "base_model.model.head.weight": (2, 3)}, specs)
    assert out["base_model.model.head.weight"] == (2, 3)
    for (module, role), (_, values, index) in state.items():
        key = f"base_model.model.{module}.apet_weights.{role}"
        assert torch.equal(out[f"{key}.values"], values) and torch.equal(out[f"{key}.index"], index), key
        assert out[f"{key}.index"].dtype == torch.int32


def test_a_layout_with_the_same_totals_but_other_modules_is_refused():
    specs = {("q", "delta"): spec((8, 8), "discrete", 3), ("v", "delta"): spec((8, 8), "discrete", 5)}
    packed = pack({key: (s, torch.zeros(s.num_entries), torch.arange(s.num_entries)) for key, s in specs.items()})
    swapped = {("q", "delta"): specs[("v", "delta")], ("v", "delta"): specs[("q", "delta")]}  # 5 + 3 entries
    with pytest.raises(ValueError, match="layout checksum differs.*per-module counts"):
        unpack(packed, swapped)
    renamed = {("k", "delta"): specs[("q", "delta")], ("v", "delta"): specs[("v", "delta")]}
    with pytest.raises(ValueError, match="layout checksum differs"):
        unpack(packed, renamed)
    newer = packed[INDEX_KEY].clone()
    newer[0] = 2
    with pytest.raises(ValueError, match=r"packed in format 2.*upgrade peft-apet"):
        unpack({**packed, INDEX_KEY: newer}, specs)
    with pytest.raises(ValueError, match=r"its packed tensors are \['apet_packed.bias', 'apet_packed.index'"):
        unpack({**packed, "apet_packed.bias": torch.zeros(1)}, specs)


def test_a_saved_file_has_the_documented_keys_and_is_small(tmp_path):
    model = get_peft_model(tiny_llama(), APETConfig.delta(mask="discrete", num_trainable_params=1000,
                                                          task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    assert sorted(tensors) == [INDEX_KEY, VALUES_KEY]
    assert tensors[INDEX_KEY].dtype == torch.uint8 and tensors[VALUES_KEY].dtype == torch.float32
    assert tensors[VALUES_KEY].shape == (1000,)
    data = (tmp_path / WEIGHTS).read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    assert header <= 200  # two tensors, whatever the number of modules (0.1: two per module, ~135 bytes each)
    assert len(data) / 1000 <= 6.0


# ---------------------------------------------------------------------------------------------- every path
def test_several_adapters_save_load_save_byte_identical(tmp_path):
    model = get_peft_model(tiny_bert(), unified(seed=1))
    model.add_adapter("second", APETConfig.lora(mask="discrete", num_trainable_params=300, task_type="SEQ_CLS",
                                                init_weights=False))
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a")
    loaded.load_adapter(tmp_path / "a" / "second", adapter_name="second")
    loaded.save_pretrained(tmp_path / "b")
    for folder in ("", "second"):
        first, again = (tmp_path / d / folder / WEIGHTS for d in "ab")
        assert first.read_bytes() == again.read_bytes(), folder
    for name in ("default", "second"):
        assert_same_tensors(apet_tensors(model, name), apet_tensors(loaded, name))


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_low_cpu_mem_usage_loads_the_same_adapter(tmp_path, how):
    model = get_peft_model(tiny_bert(), unified()).eval()
    model.save_pretrained(tmp_path)
    if how == "from_pretrained":
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=True).eval()
        name = "default"
    else:
        loaded = get_peft_model(tiny_bert(), APETConfig.bitfit(task_type="SEQ_CLS")).eval()
        loaded.load_adapter(tmp_path, adapter_name=(name := "other"), low_cpu_mem_usage=True)
        loaded.set_adapter(name)
    assert_same_tensors(apet_tensors(model), apet_tensors(loaded, name))
    inputs = model_inputs("bert")
    torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs), rtol=0, atol=0)


def test_get_and_set_peft_model_state_dict_round_trip():
    trained = get_peft_model(tiny_bert(), unified(seed=1))
    other = get_peft_model(tiny_bert(), unified(seed=2))  # other masks, same layout
    state = get_peft_model_state_dict(trained)
    assert any(key.startswith("apet_packed.") for key in state)
    result = set_peft_model_state_dict(other, state)
    assert not result.unexpected_keys
    assert_same_tensors(apet_tensors(trained), apet_tensors(other))
    again = get_peft_model_state_dict(other)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_a_meta_model_packs_to_tensors_of_the_right_shapes():
    # (no lora/adapter part: counting their learnable entries at creation needs real masks)
    config = APETConfig.combine(APETConfig.bitfit(), APETConfig.delta(mask="discrete"), num_trainable_params=1500,
                                task_type="SEQ_CLS")
    with torch.device("meta"):
        base = tiny_bert()
    meta = get_peft_model(base, config)
    real = get_peft_model(tiny_bert(), config)
    meta_state, real_state = get_peft_model_state_dict(meta), get_peft_model_state_dict(real)
    assert meta_state.keys() == real_state.keys()
    for key, value in real_state.items():
        assert meta_state[key].shape == value.shape and meta_state[key].dtype == value.dtype, key


def test_a_damaged_packed_code_is_refused_before_anything_is_copied(tmp_path):
    get_peft_model(tiny_bert(), unified()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    code = tensors[INDEX_KEY].clone()
    code[-1] = 0  # the last byte of the last role's (lora_A) high-part bitmap: its last entry's one is gone
    save_file({**tensors, INDEX_KEY: code}, tmp_path / WEIGHTS, metadata={"format": "pt"})
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"packed mask index is damaged.*Nothing was loaded or changed"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, APETLayer) for m in base.modules())
    model = get_peft_model(tiny_bert(), unified())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"loaded into adapter 'default' does not fit.*damaged"):
        set_peft_model_state_dict(model, load_file(tmp_path / WEIGHTS))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
