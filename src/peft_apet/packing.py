"""Packed adapter files: all of an adapter's APET tensors in two tensors, instead of two tensors per module.

peft-apet 0.1 saved `<module>.apet_weights.<role>.values` and `.index` for every adapted module, so at k = 1,000
the safetensors header alone (about 140 bytes per tensor) made a file 24-36 bytes per trainable parameter. Every
save path now writes the packed form (`APETModel._get_adapter_state_dict`, which `save_pretrained`, the Trainer's
checkpoints and DeepSpeed ZeRO-3's consolidated save all go through); loading unpacks it into the per-module state
dict before any check or copy (`peft_apet.checks.check_state_fits_model`), and still reads 0.1 files as they are.

Format 1. The marker is the key prefix `apet_packed.` (0.1 files have no such key); keys hold neither the adapter
name nor PEFT's `base_model.model.` prefix. Other tensors (`modules_to_save` heads, trainable token rows) are saved
by PEFT as before.

- The layout (not stored: the reader knows it from its own plan): every APET tensor of the adapter as
  `(role, module)`, module names as in the model under `base_model.model.`, sorted by role, then module; each with
  its logical shape, mask (`discrete`, `adjacent` or none), mask axis and `k` (its number of trainable entries).
- `apet_packed.values`: 1-D, every tensor's `values` concatenated in layout order, in their common dtype
  (`torch.promote_types` of theirs, so exact).
- `apet_packed.index`: 1-D uint8, a 9-byte head then the masks:
  - byte 0: format version (1); bytes 1-4: number of APET tensors; bytes 5-8: CRC-32 of `layout_text` (one line
    `role module shape mask axis k` per tensor); both little-endian uint32. A file written for another layout
    (other modules, shapes, masks or per-module counts) is refused even where all totals agree;
  - then, per role that has a masked tensor (in layout order), one Elias-Fano code (`peft_apet.index_codec`) of
    the ids of all the role's tensors in one universe. A tensor's ids are its flat positions (discrete; universe
    its number of entries), its line ids (adjacent; universe its number of lines) or none (unmasked; universe 0),
    shifted by the universes of the role's tensors before it. Counts and universes follow from the layout, so
    the codes need no lengths or separators; a code costs about `log2(N / K) + 2` bits per id for K ids among
    the role's N (one big sparse set per role, not one code per module).

Two tensors whatever the number of modules: the header is about 200 bytes, 0.2 B per parameter at k = 1,000.
Unpacking gives, per tensor, `base_model.model.<module>.apet_weights.<role>.values` (a copy, in the file's dtype)
and `.index` (int32 positions or line ids, empty when unmasked): the state dict a 0.1 file holds.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .index_codec import decode_indices, encode_indices, encoded_size, stored_positions
from .masks import INDEX_DTYPE, line_length, num_lines

PACKED_PREFIX = "apet_packed."
VALUES_KEY, INDEX_KEY = PACKED_PREFIX + "values", PACKED_PREFIX + "index"
FORMAT_VERSION = 1
HEAD_BYTES = 9  # version (1 byte), number of tensors, layout checksum (uint32 each)
PEFT_PREFIX = "base_model.model."

Key = tuple[str, str]  # (module, role)
Layout = Mapping[Key, tuple[Any, int]]  # (module, role) -> (spec: shape, mask, axis; k)


def is_packed_key(key: str) -> bool:
    return key.startswith(PACKED_PREFIX)


def _order(layout: Layout) -> list[Key]:
    """Layout order: by role, then module."""
    return sorted(layout, key=lambda key: (key[1], key[0]))


def _ids(spec: Any, k: int) -> tuple[int, int]:
    """`(count, universe)` of a tensor's mask ids: positions (discrete), lines (adjacent), none (unmasked)."""
    if spec.mask is None:
        return 0, 0
    if spec.mask == "discrete":
        return k, math.prod(spec.shape)
    return math.ceil(k / line_length(spec.shape, spec.axis)), num_lines(spec.shape, spec.axis)


def _roles(layout: Layout) -> list[tuple[list[Key], int, int]]:
    """Per role with a masked tensor, in layout order: its tensors, and the count and universe of its ids."""
    out = []
    for role in sorted({role for _, role in layout}):
        keys = [key for key in _order(layout) if key[1] == role]
        if any(layout[key][0].mask is not None for key in keys):
            count, universe = (sum(c) for c in zip(*(_ids(*layout[key]) for key in keys)))
            out.append((keys, count, universe))
    return out


def layout_text(layout: Layout) -> str:
    """One line `role module shape mask axis k` per tensor, in layout order."""
    lines = []
    for module, role in _order(layout):
        spec, k = layout[(module, role)]
        axis = spec.axis if spec.mask == "adjacent" else "-"
        lines.append(f"{role} {module} {'x'.join(map(str, spec.shape))} {spec.mask or 'full'} {axis} {k}")
    return "\n".join(lines)


def _head(layout: Layout) -> bytes:
    checksum = zlib.crc32(layout_text(layout).encode())
    return struct.pack("<BII", FORMAT_VERSION, len(layout), checksum)


def index_size(layout: Layout) -> int:
    """Bytes of `apet_packed.index` for `layout`."""
    return HEAD_BYTES + sum(encoded_size(count, universe) for _, count, universe in _roles(layout))


def _own_ids(key: Key, spec: Any, k: int, stored: torch.Tensor | None) -> torch.Tensor:
    """int64 ids of one tensor's mask, checked: the packed code must not let one tensor's ids spill into another's."""
    count, universe = _ids(spec, k)
    if spec.mask == "discrete":
        stored = stored_positions(stored, k, universe)
    ids = stored.detach().cpu().to(torch.int64).reshape(-1)
    if ids.numel() != count or (count and (int(ids[0]) < 0 or int(ids[-1]) >= universe)) or not bool(
            (ids[1:] > ids[:-1]).all()):
        raise ValueError(f"cannot save {key[0]} ({key[1]}): its mask index is not {count} strictly increasing ids "
                         f"in [0, {universe})")
    return ids


def pack(tensors: Mapping[Key, tuple[Any, torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """`{apet_packed.values, apet_packed.index}` (format above) of `tensors`: `(module, role) -> (spec, values (k,),
    index)`, the index as a state dict holds it (int32 ids; a discrete one may be its uint8 code) or None when
    unmasked. On the device of the first values; meta tensors give meta tensors of the right sizes. Raises
    ValueError for an index that does not fit its tensor."""
    layout = {key: (spec, values.numel()) for key, (spec, values, _) in tensors.items()}
    values = [tensors[key][1].detach().reshape(-1) for key in _order(layout)]
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
    packed_values = torch.cat([v.to(device=values[0].device, dtype=dtype) for v in values])  # e.g. device_map
    if packed_values.is_meta or any(i is not None and i.is_meta for _, _, i in tensors.values()):
        return {VALUES_KEY: packed_values, INDEX_KEY: torch.empty(index_size(layout), dtype=torch.uint8,
                                                                  device="meta")}
    codes = [torch.frombuffer(bytearray(_head(layout)), dtype=torch.uint8)]
    for keys, _, universe in _roles(layout):
        shifted, offset = [torch.empty(0, dtype=torch.int64)], 0
        for key in keys:
            spec, values_of_key, stored = tensors[key]
            if spec.mask is not None:
                shifted.append(_own_ids(key, spec, values_of_key.numel(), stored) + offset)
            offset += _ids(spec, values_of_key.numel())[1]
        codes.append(encode_indices(torch.cat(shifted), universe))
    return {VALUES_KEY: packed_values, INDEX_KEY: torch.cat(codes).to(packed_values.device)}


def pack_entries(entries: Mapping[str, torch.Tensor], adapter_name: str,
                 module_of: Callable[[str], Any]) -> dict[str, torch.Tensor]:
    """`entries` as PEFT's `BaseTuner._get_adapter_state_dict` selects them, with the APET tensors of `adapter_name`
    (`<path>.apet_weights.<adapter>.<role>.values` / `.index`) replaced by the packed tensors; `module_of(path)` is
    the `MaskedWeight` at `path` (its shape, mask and axis; `k` is read from the values, whole even under ZeRO-3)."""
    marker = f".apet_weights.{adapter_name}."
    tensors, out = {}, {}
    for key, value in entries.items():
        head, found, tail = key.rpartition(marker)
        if not found:
            out[key] = value
        elif tail.endswith(".values"):
            path = key.removesuffix(".values")
            tensors[(head.removeprefix(PEFT_PREFIX), tail.removesuffix(".values"))] = (
                module_of(path), value, entries.get(path + ".index"))
    return {**out, **pack(tensors)} if tensors else out


def _fit_problems(packed: Mapping[str, torch.Tensor], layout: Layout) -> list[str]:
    """Why the packed tensors cannot be the file of `layout` (empty if they can), most specific first."""
    if set(packed) != {VALUES_KEY, INDEX_KEY}:
        return [f"its packed tensors are {sorted(packed)}, expected {[INDEX_KEY, VALUES_KEY]}"]
    values, index = packed[VALUES_KEY], packed[INDEX_KEY]
    if index.dtype != torch.uint8 or index.dim() != 1 or index.numel() < HEAD_BYTES:
        return [f"{INDEX_KEY} is {tuple(index.shape)} ({index.dtype}), expected 1-D uint8 of at least {HEAD_BYTES} "
                "bytes"]
    version, count, checksum = struct.unpack("<BII", bytes(index[:HEAD_BYTES].tolist())) if not index.is_meta else (
        FORMAT_VERSION, len(layout), None)
    if version != FORMAT_VERSION:
        return [f"it is packed in format {version}, and this peft-apet reads format {FORMAT_VERSION} (and 0.1's "
                "per-module files); upgrade peft-apet"]
    problems = []
    if count != len(layout):
        problems.append(f"it holds {count} APET tensors, this model's adapter has {len(layout)}")
    k = sum(k for _, k in layout.values())
    if values.dim() != 1 or not values.is_floating_point():
        problems.append(f"{VALUES_KEY} is {tuple(values.shape)} ({values.dtype}), expected 1-D floating")
    elif values.numel() != k:
        problems.append(f"{values.numel()} values in the file, {k} in this model's adapter")
    if index.numel() != index_size(layout):
        problems.append(f"a mask index of {index.numel()} bytes in the file, {index_size(layout)} for the masks of "
                        "this model's adapter")
    if not problems and checksum is not None and checksum != struct.unpack("<BII", _head(layout))[2]:
        problems.append("its layout checksum differs from this model's adapter: the totals agree, but module "
                        "names, shapes, masks or per-module counts differ (see `peft_apet.packing.layout_text`)")
    return problems


def unpack(state: Mapping[str, Any], expected: Mapping[Key, Any]) -> dict[str, Any]:
    """`state` (a checkpoint state dict, key -> tensor; other entries pass through as they are) with its packed
    tensors replaced by the per-module tensors of `expected` (`(module, role) -> TensorPlan or MaskedWeight`, with
    `num_entries`); a state without packed tensors (peft-apet 0.1) is returned as a copy.

    Raises ValueError saying why if the packed tensors do not fit `expected` or their code is damaged.
    """
    out = {key: value for key, value in state.items() if not is_packed_key(key)}
    packed = {key: value for key, value in state.items() if is_packed_key(key)}
    if not packed:
        return out
    layout = {key: (spec, spec.num_entries) for key, spec in expected.items()}
    problems = _fit_problems(packed, layout)
    if problems:
        raise ValueError("; ".join(problems))
    values, index = packed[VALUES_KEY], packed[INDEX_KEY]
    ids, start = _decoded(index, layout), 0
    for key in _order(layout):
        spec, k = layout[key]
        name = f"{PEFT_PREFIX}{key[0]}.apet_weights.{key[1]}"
        out[f"{name}.values"] = values[start:start + k].clone()
        out[f"{name}.index"] = ids.get(key, torch.empty(0, dtype=INDEX_DTYPE, device=index.device))
        start += k
    return out


def _decoded(index: torch.Tensor, layout: Layout) -> dict[Key, torch.Tensor]:
    """The int32 ids of every masked tensor (on the code's device); ValueError if a code is damaged."""
    out, start = {}, HEAD_BYTES
    for keys, count, universe in _roles(layout):
        size = encoded_size(count, universe)
        if index.is_meta:
            ids = torch.empty(count, dtype=torch.int64, device="meta")
        else:
            try:
                ids = decode_indices(index[start:start + size], count, universe, dtype=torch.int64)
            except ValueError as e:
                raise ValueError(f"its packed mask index is damaged ({e})") from e
        start, first, offset = start + size, 0, 0
        for key in keys:
            own, universe_of_key = _ids(*layout[key])
            shifted = ids[first:first + own]
            out[key] = (shifted - offset if not shifted.is_meta else shifted).to(INDEX_DTYPE).to(index.device)
            first, offset = first + own, offset + universe_of_key
    return out
