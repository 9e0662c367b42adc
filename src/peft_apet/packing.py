"""Packed adapter files: an adapter's APET tensors stored as a few tensors per role, not two per module.

peft-apet 0.1 saved `<module>.apet_weights.<role>.values` and `.index` for every adapted module, so at k = 1,000
the safetensors header alone (about 140 bytes per tensor) made a file 24-36 bytes per trainable parameter. Every
save path now writes the packed form (`APETModel._get_adapter_state_dict`, which `save_pretrained`, the Trainer's
checkpoints and DeepSpeed ZeRO-3's consolidated save all go through); loading unpacks it into the per-module state
dict before any check or copy (`peft_apet.checks.check_state_fits_model`), and still reads 0.1 files as they are.

Format 1. The marker is the key prefix `apet_packed.` (0.1 files have no such key); keys hold neither the adapter
name nor PEFT's `base_model.model.` prefix.

- The layout (not stored, known to the reader from its own plan): every APET tensor of the adapter as
  `(module, role)`, module names as in the model under `base_model.model.`, sorted by `(module, role)`; each with
  its logical shape, mask (`discrete`, `adjacent` or none), mask axis and `k` (its number of trainable entries).
- `apet_packed.layout`: int64 `(3,)`: format version (1), number of APET tensors, CRC-32 of `layout_text` (one line
  `module role shape mask axis k` per tensor). A file written for another layout (other modules, shapes, masks or
  per-module counts) is refused even where all totals agree.
- For each role present, sorted by name (`adapter_down`, `bias`, `delta`, `lora_A`, ...):
  - `apet_packed.<role>.values`: 1-D, the `values` of the role's tensors concatenated in layout order, in their
    common dtype (`torch.promote_types` of theirs, so exact).
  - `apet_packed.<role>.index`: 1-D uint8, present when some tensor of the role has a mask: one Elias-Fano code
    (`peft_apet.index_codec`) of the ids of all the role's tensors in one universe. A tensor's ids are its flat
    positions (discrete; universe its number of entries), its line ids (adjacent; universe its number of lines)
    or none (unmasked; universe 0), shifted by the universes of the tensors before it. Count and universe follow
    from the layout, so the code has no header; its cost per entry is that of one big sparse set, about
    `log2(N / K) + 2` bits for K trainable entries among the role's N.

Unpacking gives, per tensor, `base_model.model.<module>.apet_weights.<role>.values` (a copy, in the file's dtype)
and `.index` (int32 positions or line ids, empty when unmasked): the state dict a 0.1 file holds.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from .index_codec import decode_indices, encode_indices, encoded_size, stored_positions
from .masks import INDEX_DTYPE, line_length, num_lines

PACKED_PREFIX = "apet_packed."
LAYOUT_KEY = PACKED_PREFIX + "layout"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."

Key = tuple[str, str]  # (module, role)


class TensorSpec(Protocol):
    """What the layout needs of a tensor: a `TensorPlan` or a `MaskedWeight`."""

    shape: tuple[int, ...]
    mask: str | None
    axis: int


def is_packed_key(key: str) -> bool:
    return key.startswith(PACKED_PREFIX)


def _ids(spec: TensorSpec, k: int) -> tuple[int, int]:
    """`(count, universe)` of a tensor's mask ids: positions (discrete), lines (adjacent), none (unmasked)."""
    if spec.mask is None:
        return 0, 0
    if spec.mask == "discrete":
        return k, math.prod(spec.shape)
    return math.ceil(k / line_length(spec.shape, spec.axis)), num_lines(spec.shape, spec.axis)


def layout_text(layout: Mapping[Key, tuple[TensorSpec, int]]) -> str:
    """One line `module role shape mask axis k` per tensor, in layout order (`(module, role) -> (spec, k)`)."""
    lines = []
    for (module, role), (spec, k) in sorted(layout.items()):
        axis = spec.axis if spec.mask == "adjacent" else "-"
        lines.append(f"{module} {role} {'x'.join(map(str, spec.shape))} {spec.mask or 'full'} {axis} {k}")
    return "\n".join(lines)


def _layout_tensor(layout: Mapping[Key, tuple[TensorSpec, int]]) -> torch.Tensor:
    checksum = zlib.crc32(layout_text(layout).encode())
    return torch.tensor([FORMAT_VERSION, len(layout), checksum], dtype=torch.int64)


def _own_ids(key: Key, spec: TensorSpec, k: int, stored: torch.Tensor | None) -> torch.Tensor:
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


def _encode(role_tensors: list[tuple[Key, TensorSpec, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    shifted, total, offset = [], 0, 0
    meta = any(v.is_meta or (i is not None and i.is_meta) for _, _, v, i in role_tensors)
    for key, spec, values, stored in role_tensors:
        count, universe = _ids(spec, values.numel())
        if count and not meta:
            shifted.append(_own_ids(key, spec, values.numel(), stored) + offset)
        total, offset = total + count, offset + universe
    if meta:  # shapes only (a model on the meta device): a code of the right size
        return torch.empty(encoded_size(total, offset), dtype=torch.uint8, device="meta")
    return encode_indices(torch.cat(shifted) if shifted else torch.empty(0, dtype=torch.int64), offset)


def pack(tensors: Mapping[Key, tuple[TensorSpec, torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The packed tensors (format above) of `tensors`: `(module, role) -> (spec, values (k,), index)`, the index as a
    state dict holds it (int32 ids; a discrete one may be its uint8 code) or None when unmasked. On the device of
    the values; meta values give meta tensors of the right sizes. Raises ValueError for an index that does not fit."""
    out = {}
    device = next(iter(tensors.values()))[1].device
    for role in sorted({role for _, role in tensors}):
        rows = [(key, *tensors[key]) for key in sorted(tensors) if key[1] == role]
        values = [v.detach().reshape(-1) for _, _, v, _ in rows]
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
        out[f"{PACKED_PREFIX}{role}.values"] = torch.cat([v.to(dtype) for v in values])
        if any(spec.mask is not None for _, spec, _, _ in rows):
            out[f"{PACKED_PREFIX}{role}.index"] = _encode(rows).to(device)
    out[LAYOUT_KEY] = _layout_tensor({key: (spec, v.numel()) for key, (spec, v, _) in tensors.items()}).to(device)
    return out


def pack_entries(entries: Mapping[str, torch.Tensor], adapter_name: str,
                 module_of: Callable[[str], TensorSpec]) -> dict[str, torch.Tensor]:
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


def _fit_problems(packed: Mapping[str, torch.Tensor], layout: Mapping[Key, tuple[TensorSpec, int]]) -> list[str]:
    """Why the packed tensors cannot be the file of `layout` (empty if they can), most specific first."""
    marker = packed.get(LAYOUT_KEY)
    if marker is None or marker.dtype != torch.int64 or tuple(marker.shape) != (3,):
        return [f"its packed tensors (`{PACKED_PREFIX}*`) have no valid `{LAYOUT_KEY}` int64 (3,) tensor"]
    if not marker.is_meta and int(marker[0]) != FORMAT_VERSION:
        return [f"it is packed in format {int(marker[0])}, and this peft-apet reads format {FORMAT_VERSION} (and "
                "0.1's per-module files); upgrade peft-apet"]
    roles = {role for _, role in layout}
    known = {LAYOUT_KEY} | {f"{PACKED_PREFIX}{r}.{t}" for r in roles for t in ("values", "index")}
    problems = [f"unexpected packed tensors {sorted(set(packed) - known)} (roles of this model's adapter: "
                f"{sorted(roles)})"] if set(packed) - known else []
    if not marker.is_meta and int(marker[1]) != len(layout):
        problems.append(f"it holds {int(marker[1])} APET tensors, this model's adapter has {len(layout)}")
    for role in sorted(roles):
        rows = [layout[key] for key in sorted(layout) if key[1] == role]
        values, index = packed.get(f"{PACKED_PREFIX}{role}.values"), packed.get(f"{PACKED_PREFIX}{role}.index")
        k = sum(k for _, k in rows)
        if values is None or values.dim() != 1 or not values.is_floating_point():
            found = "none" if values is None else f"{tuple(values.shape)} ({values.dtype})"
            problems.append(f"role {role}: values {found} in the file, expected a 1-D floating tensor")
        elif values.numel() != k:
            problems.append(f"role {role}: {values.numel()} values in the file, {k} in this model's adapter")
        count, universe = (sum(c) for c in zip(*(_ids(spec, k) for spec, k in rows)))
        masked = any(spec.mask is not None for spec, _ in rows)
        size = encoded_size(count, universe)
        if masked and (index is None or index.dtype != torch.uint8 or tuple(index.shape) != (size,)):
            found = "no mask index" if index is None else f"a mask index {tuple(index.shape)} ({index.dtype})"
            problems.append(f"role {role}: {found} in the file, expected uint8 ({size},): the code of {count} ids "
                            f"among {universe} in this model's adapter")
        elif not masked and index is not None:
            problems.append(f"role {role}: the file has a mask index, this model's adapter has no mask there")
    if not problems and not marker.is_meta and int(marker[2]) != int(_layout_tensor(layout)[2]):
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
    for role in sorted({role for _, role in layout}):
        keys = [key for key in sorted(layout) if key[1] == role]
        values, index = packed[f"{PACKED_PREFIX}{role}.values"], packed.get(f"{PACKED_PREFIX}{role}.index")
        counts = [_ids(layout[key][0], layout[key][1]) for key in keys]
        ids = _decoded(index, counts)
        start = id_start = offset = 0
        for key, (count, universe) in zip(keys, counts):
            k = layout[key][1]
            name = f"{PEFT_PREFIX}{key[0]}.apet_weights.{role}"
            out[f"{name}.values"] = values[start:start + k].clone()
            own = ids[id_start:id_start + count]
            out[f"{name}.index"] = (own - offset).to(INDEX_DTYPE) if not own.is_meta else own.to(INDEX_DTYPE)
            start, id_start, offset = start + k, id_start + count, offset + universe
    return out


def _decoded(index: torch.Tensor | None, counts: list[tuple[int, int]]) -> torch.Tensor:
    """int64 ids of a role's code (on the code's device); ValueError if damaged."""
    count, universe = (sum(c) for c in zip(*counts))
    if index is None:
        return torch.empty(0, dtype=torch.int64)
    if index.is_meta:
        return torch.empty(count, dtype=torch.int64, device="meta")
    try:
        return decode_indices(index, count, universe, dtype=torch.int64).to(index.device)
    except ValueError as e:
        raise ValueError(f"its packed mask index is damaged ({e})") from e
