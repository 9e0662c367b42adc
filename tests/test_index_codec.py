"""The on-disk code of discrete masks: exact round trips, sizes near the entropy bound, old files still load."""

from __future__ import annotations

import copy
import io
import math
import struct
import time

import pytest
import torch
from conftest import model_inputs, model_output, tiny_bert, tiny_llama, write_per_module
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_apet import APETConfig, APETLayer
from peft_apet.index_codec import decode_indices, encode_indices, encoded_size, low_bits


@st.composite
def masks(draw):
    universe = draw(st.integers(1, 5000) | st.sampled_from([2**20, 2**31 - 1]))
    count = draw(st.integers(0, min(universe, 300)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if universe <= 5000:
        index = torch.randperm(universe, generator=g)[:count].sort().values
    else:
        index = torch.randint(0, universe, (count,), generator=g).unique()
    return index, universe


@settings(max_examples=300, deadline=None)
@given(masks())
def test_round_trip_is_exact(case):
    index, universe = case
    code = encode_indices(index.to(torch.int32), universe)
    assert code.dtype == torch.uint8 and code.numel() == encoded_size(index.numel(), universe)
    # the documented bound: k (L + 3) bits, plus at most 2 bytes of padding
    assert code.numel() <= (index.numel() * (low_bits(index.numel(), universe) + 3) + 7) // 8 + 2
    decoded = decode_indices(code, index.numel(), universe)
    assert decoded.dtype == torch.int32 and torch.equal(decoded.long(), index.long())


@pytest.mark.parametrize("universe,count", [(1, 0), (1, 1), (8, 8), (1000, 1000), (1000, 1), (1000, 999)])
def test_edge_cases_round_trip(universe, count):
    index = torch.arange(universe)[:count] if count != 1 else torch.tensor([universe - 1])
    assert torch.equal(decode_indices(encode_indices(index, universe), count, universe).long(), index)


def test_ten_million_entries_round_trip_quickly():
    count, universe = 10**7, 2**31 - 1
    step = universe // count
    index = torch.arange(count, dtype=torch.int64) * step + torch.randint(0, step, (count,))  # strictly increasing
    start = time.perf_counter()
    code = encode_indices(index.to(torch.int32), universe)
    decoded = decode_indices(code, count, universe)
    # a few tenths of a second on an idle core; the bound only catches a per-entry Python loop (minutes)
    assert time.perf_counter() - start < 20
    assert torch.equal(decoded.long(), index)
    assert code.numel() == encoded_size(count, universe) < 1.25 * count


def test_size_is_within_two_bits_of_the_entropy_bound_and_two_bytes_down_to_density_1_in_16384():
    universe = 2048 * 2048
    for density in (1 / 2, 1 / 16, 1 / 1000, 1 / 16384, 1 / 10**5):
        count = round(universe * density)
        bits = 8 * encoded_size(count, universe) / count
        entropy = (math.lgamma(universe + 1) - math.lgamma(count + 1) - math.lgamma(universe - count + 1)) / (
            math.log(2) * count)
        assert entropy <= bits <= entropy + 2.0 + 16 / count, density
        if density >= 1 / 16384:
            assert bits <= 16.0 + 16 / count, density


def test_damaged_codes_are_refused():
    index = torch.tensor([3, 17, 40, 41, 99])
    code = encode_indices(index, 100)
    with pytest.raises(ValueError, match="expected .* bytes|bytes, expected"):
        decode_indices(code[:-1], 5, 100)
    with pytest.raises(ValueError, match="bytes, expected|marks 5 entries, expected 6"):
        decode_indices(code, 6, 100)
    broken = code.clone()
    broken[-1] ^= 0xFF  # flip high-part bits: wrong number of marked entries
    with pytest.raises(ValueError, match="damaged"):
        decode_indices(broken, 5, 100)
    with pytest.raises(ValueError, match="1-D uint8"):
        decode_indices(index.to(torch.int32), 5, 100)
    # positions 0 and 1 of 4 (L = 1): zeroing the low bits decodes to 0, 0
    with pytest.raises(ValueError, match="not strictly increasing"):
        decode_indices(torch.cat([torch.zeros(1, dtype=torch.uint8), encode_indices(torch.tensor([0, 1]), 4)[1:]]),
                       2, 4)
    # position 2 of 3 (L = 1): setting its low bit decodes to 3, outside the tensor
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        decode_indices(encode_indices(torch.tensor([2]), 3) | torch.tensor([1, 0], dtype=torch.uint8), 1, 3)


@pytest.mark.parametrize("index", [[3, 3, 5], [5, 3], [-1, 4], [4, 100]])
def test_only_strictly_increasing_positions_in_range_are_encoded(index):
    with pytest.raises(ValueError, match=r"strictly increasing in \[0, 100\)"):
        encode_indices(torch.tensor(index), 100)


# ---------------------------------------------------------------------------------------------- through PEFT
def discrete_delta(k: int, task_type: str = "SEQ_CLS") -> APETConfig:
    return APETConfig.delta(mask="discrete", num_trainable_params=k, task_type=task_type, init_weights=False)


def index_keys(tensors: dict) -> list[str]:
    return [key for key in tensors if key.endswith(".index")]


@pytest.mark.parametrize("k", [200, 1_000, 20_480])
def test_adapter_files_store_at_most_six_bytes_per_trainable_fp32_entry_plus_the_header(tmp_path, k):
    """The tensor data take at most 6 bytes per fp32 entry; the whole file adds safetensors' 8-byte length and JSON
    header, at most 140 bytes per stored tensor (two tensors in all: `peft_apet.packing`)."""
    # tiny Llama's delta targets hold 20,480 entries: densities 1/102 to 1 (each tensor also rounds to whole bytes)
    model = get_peft_model(tiny_llama(), discrete_delta(k, "CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(tensors[key].dtype == torch.uint8 for key in index_keys(tensors))
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert stored == len(data) - 8 - struct.unpack("<Q", data[:8])[0]  # the file, less its JSON header
    assert sum(t.numel() for key, t in tensors.items() if key.endswith(".values")) == k
    assert stored / k <= 6.0
    assert len(data) <= 6 * k + 8 + 140 * len(tensors)


def test_save_load_save_is_byte_identical_and_outputs_match(tmp_path):
    model = get_peft_model(tiny_bert(), discrete_delta(500)).eval()
    inputs = model_inputs("bert")
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a").eval()
    torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "b")
    first, second = (tmp_path / d / "adapter_model.safetensors" for d in "ab")
    assert first.read_bytes() == second.read_bytes()


def test_an_int32_index_saved_by_peft_apet_0_1_still_loads(tmp_path):
    model = get_peft_model(tiny_bert(), discrete_delta(500)).eval()
    inputs = model_inputs("bert")
    model.save_pretrained(tmp_path)
    write_per_module(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, APETLayer)}
    for key in index_keys(tensors):  # rewrite the file as 0.1.0 wrote it: the plain int32 positions
        module = key.removeprefix("base_model.model.").split(".apet_weights.")[0]
        tensors[key] = layers[module].apet_weights["default"]["delta"].index.clone()
        assert tensors[key].dtype == torch.int32
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs), rtol=0, atol=0)


DAMAGED_CODE = {  # file format -> what the error says
    "0.1 (per module)": r"encoded mask index of \d+ bytes.*Nothing was loaded or changed",
    "packed": r"a mask index of \d+ bytes in the file, \d+ for the masks of this model's adapter.*Nothing was loaded "
              r"or changed",
}


@pytest.mark.parametrize("form", sorted(DAMAGED_CODE))
def test_a_damaged_code_is_refused_before_the_model_changes(tmp_path, form):
    model = get_peft_model(tiny_bert(), discrete_delta(500))
    model.save_pretrained(tmp_path)
    if form != "packed":
        write_per_module(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = index_keys(tensors)[0]
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    base = tiny_bert()
    with pytest.raises(ValueError, match=DAMAGED_CODE[form]):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, APETLayer) for m in base.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_state_dict_converted_wholesale_to_floats_still_loads_its_masks(dtype):
    model = get_peft_model(tiny_bert(), discrete_delta(300))
    converted = {k: v.to(dtype) for k, v in model.state_dict().items()}  # codes included
    other = get_peft_model(tiny_bert(), APETConfig.delta(mask="discrete", num_trainable_params=300, seed=7,
                                                         task_type="SEQ_CLS"))
    other.load_state_dict(converted)
    for (name, a), b in zip(model.named_buffers(), other.buffers()):
        if name.endswith(".index"):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- module state dicts
def index_buffers(model) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers() if name.endswith(".index")}


def test_state_dicts_hold_codes_while_the_buffers_stay_int32_positions():
    model = get_peft_model(tiny_bert(), discrete_delta(300))
    state = model.state_dict()
    buffers = index_buffers(model)
    assert buffers and all(b.dtype == torch.int32 for b in buffers.values())
    assert all(state[name].dtype == torch.uint8 for name in buffers)
    assert all(b.dtype == torch.int32 for b in index_buffers(copy.deepcopy(model).to(torch.float64)).values())
    adjacent = get_peft_model(tiny_bert(), APETConfig.delta(mask="adjacent", num_trainable_params=300,
                                                            task_type="SEQ_CLS"))
    assert all(v.dtype == torch.int32 for k, v in adjacent.state_dict().items() if k.endswith(".index"))


@pytest.mark.parametrize("legacy", [False, True])
def test_load_state_dict_strict_accepts_codes_and_int32_positions(legacy):
    model = get_peft_model(tiny_bert(), discrete_delta(300))
    state = model.state_dict()
    if legacy:  # the in-memory positions, as peft-apet 0.1 state dicts held them
        state.update({k: v.clone() for k, v in index_buffers(model).items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = get_peft_model(tiny_bert(), APETConfig.delta(mask="discrete", num_trainable_params=300, seed=7,
                                                         task_type="SEQ_CLS"))
    assert not all(torch.equal(a, b) for a, b in zip(index_buffers(model).values(), index_buffers(other).values()))
    other.load_state_dict(state, strict=True)
    for (name, a), b in zip(index_buffers(model).items(), index_buffers(other).values()):
        assert b.dtype == torch.int32 and torch.equal(a, b), name
    torch.testing.assert_close(model_output(other, model_inputs("bert")), model_output(model, model_inputs("bert")),
                               rtol=0, atol=0)


def test_a_damaged_code_is_refused_when_reloading_into_an_existing_adapter(tmp_path):
    model = get_peft_model(tiny_bert(), discrete_delta(500))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = index_keys(tensors)[0]
    tensors[key][-1] ^= 0x80  # one bit of the high-part bitmap: a code of the right length with a wrong count
    save_file(tensors, path, metadata={"format": "pt"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="loaded into adapter 'default' does not fit.*high-part bitmap marks"):
        model.load_adapter(tmp_path, adapter_name="default")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_meta_model_has_a_state_dict_of_the_right_shapes():
    with torch.device("meta"):
        base = tiny_bert()
    model = get_peft_model(base, discrete_delta(300))  # APET tensors follow the base weights onto `meta`
    assert all(b.is_meta for b in index_buffers(model).values())
    real = get_peft_model(tiny_bert(), discrete_delta(300))
    meta_state, real_state = model.state_dict(), real.state_dict()
    for key in index_keys(real_state):
        assert meta_state[key].is_meta and meta_state[key].shape == real_state[key].shape
