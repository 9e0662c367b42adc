"""Checks that keep a model whole when a checkpoint or an adapter is broken.

- `check_checkpoint_fits_plan`: before an adapter read from a folder is injected, its `adapter_model.safetensors`
  (or `adapter_model.bin`, read with `torch.load(weights_only=True)` as PEFT reads it) must be readable and hold
  exactly the tensors the plan for *this* model expects (same modules and roles, same number of trainable entries,
  masks that fit the logical shapes). A checkpoint of another base model (other hidden sizes, other depth) or a
  damaged file is refused before any module is replaced.
- `check_state_fits_model`: the same check against the adapter already in the model, run on every state dict
  PEFT loads, before `load_state_dict` copies anything (e.g. `load_adapter` into an existing adapter name).
- `check_merge_is_finite`: with `safe_merge=True`, every layer's merged weights are checked before the first base
  weight changes, so a broken adapter leaves all base weights bit-identical.

Checkpoint keys look like `base_model.model.<module>.apet_weights.<role>.<tensor>` (tensor: `values` or `index`);
any other key is a full tensor of the base model (e.g. a `modules_to_save` head) and must match its shape. A packed
file (`peft_apet.packing`) is unpacked against the expected tensors first: a layout that does not fit is refused
with the same error, before anything is copied.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors import SafetensorError, safe_open
from torch import nn

from .index_codec import stored_positions
from .layer import APETLayer, merged_layers
from .masks import line_length, num_lines
from .packing import is_packed_key, unpack
from .plan import AdapterPlan, TensorPlan
from .tokens import TOKENS_KEY

PEFT_PREFIX = "base_model.model."
_APET_KEY = re.compile(r"^(?P<module>.+)\.apet_weights\.(?P<role>[^.]+)\.(?P<tensor>[^.]+)$")
_SHOWN = 5  # names listed per problem in an error message


@dataclass
class _Checkpoint:
    """A checkpoint's tensors, sorted into APET tensors by `(module, role)` and other (base model) tensors."""

    apet: dict[tuple[str, str], dict[str, torch.Tensor | tuple[int, ...]]] = field(default_factory=dict)
    other: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, torch.Tensor | tuple[int, ...]]]) -> _Checkpoint:
        """`items`: `(key, tensor or shape)`; mask indices must be tensors, other entries may be shapes."""
        out = cls()
        for key, value in items:
            match = _APET_KEY.match(key.removeprefix(PEFT_PREFIX))
            if match:
                out.apet.setdefault((match["module"], match["role"]), {})[match["tensor"]] = value
            else:
                out.other[key] = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        return out


def _shape(value: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _names(items: Iterable[str]) -> str:
    items = sorted(set(items))
    more = f" ... ({len(items)} in all)" if len(items) > _SHOWN else ""
    return f"{items[:_SHOWN]}{more}"


def index_problem(spec: TensorPlan | nn.Module, index: torch.Tensor) -> str | None:
    """Why `index` cannot be the compact mask (see `peft_apet.masks`) of the tensor `spec` describes, or None.

    `spec` is a `TensorPlan` or a `MaskedWeight`: anything with `shape`, `mask`, `axis` and `num_entries`.
    """
    shape, k = tuple(spec.shape), spec.num_entries
    if spec.mask == "discrete":  # the on-disk code, or plain positions (see `peft_apet.index_codec`)
        try:
            index = stored_positions(index, k, math.prod(shape))
        except ValueError as e:
            return str(e)
    if spec.mask is None:
        length, bound = 0, 0
    elif spec.mask == "discrete":
        length, bound = k, math.prod(shape)
    else:
        length, bound = math.ceil(k / line_length(shape, spec.axis)), num_lines(shape, spec.axis)
    if index.dim() != 1 or index.numel() != length or index.is_floating_point():
        return f"mask index of shape {tuple(index.shape)} ({index.dtype}), expected {length} integer ids"
    if length and (int(index.min()) < 0 or int(index.max()) >= bound):
        return f"mask index points outside the tensor of shape {shape} (ids must be in [0, {bound}))"
    if length > 1 and not bool((index[1:] > index[:-1]).all()):
        return "mask index is not strictly increasing"
    return None


def _problems(expected: Mapping[tuple[str, str], TensorPlan | nn.Module], checkpoint: _Checkpoint,
              base_shape: Callable[[str], tuple[int, ...] | None]) -> list[str]:
    """Every way `checkpoint` differs from the `expected` APET tensors and from the base model's tensors."""
    problems = []
    missing = [f"{m} ({r})" for m, r in expected if (m, r) not in checkpoint.apet]
    if missing:
        problems.append(f"it has no tensors for modules {_names(missing)}")
    unexpected = [f"{m} ({r})" for m, r in checkpoint.apet if (m, r) not in expected]
    if unexpected:
        problems.append(f"it has tensors for modules this model's adapter does not have: {_names(unexpected)}")
    for (module, role), spec in expected.items():
        tensors = checkpoint.apet.get((module, role))
        if tensors is None:
            continue
        if "values" not in tensors:
            problems.append(f"{module} ({role}): no `values` tensor")
        elif _shape(tensors["values"]) != (spec.num_entries,):
            problems.append(f"{module} ({role}): values of shape {_shape(tensors['values'])} in the checkpoint, "
                            f"({spec.num_entries},) in this model (the trainable entries of a {tuple(spec.shape)} "
                            "tensor)")
        index = tensors.get("index")
        if index is None and spec.mask is not None:
            problem = f"no `index` tensor (the {spec.mask} mask of its {spec.num_entries} entries)"
        else:
            problem = index_problem(spec, index) if isinstance(index, torch.Tensor) else None
        if problem:
            problems.append(f"{module} ({role}): {problem}")
    for key, shape in checkpoint.other.items():
        found = base_shape(key)
        if found is None:
            problems.append(f"{key}: no such tensor in this model")
        elif found != shape:
            problems.append(f"{key}: shape {shape} in the checkpoint, {found} in this model")
    return problems


def _raise(source: str, problems: list[str], outcome: str) -> None:
    if problems:
        more = f"; ... ({len(problems)} problems in all)" if len(problems) > _SHOWN else ""
        raise ValueError(
            f"the APET checkpoint {source} does not fit this model: " + "; ".join(problems[:_SHOWN]) + more
            + f". Was it saved from another base model (other sizes or number of layers) or another config? {outcome}"
        )


def _tensor_shape(model: nn.Module, key: str) -> tuple[int, ...] | None:
    """Shape of the tensor `key` of `model`, looking through tuner layers and modules_to_save wrappers."""
    *path, attr = key.split(".")
    module = model
    for name in path:
        child = module._modules.get(name)
        if child is None and isinstance(module, AuxiliaryTrainingWrapper):
            child = module.original_module._modules.get(name)
        if child is None and isinstance(module, BaseTunerLayer):
            child = module.get_base_layer()._modules.get(name)
        if child is None:
            return None
        module = child
    if isinstance(module, AuxiliaryTrainingWrapper):
        module = module.original_module
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    tensor = module._parameters.get(attr, module._buffers.get(attr))
    return None if tensor is None else tuple(tensor.shape)


def _read_checkpoint(path: str) -> dict[str, torch.Tensor | tuple[int, ...]]:
    """Shapes of every tensor in a safetensors file, its mask indices and packed tensors; ValueError naming the file
    if damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) if key.endswith(".index") or is_packed_key(key) else
                    tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is damaged and cannot be read ({e}); save the adapter again. Nothing was "
                         "loaded or changed.") from e


def _read_pickle_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The same as `_read_checkpoint` for an `adapter_model.bin`, read with `torch.load(weights_only=True)` (tensors
    and plain containers only: no code in the file runs); ValueError naming the file if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"{path} cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: {e}); "
                         "save the adapter again (as safetensors). Nothing was loaded or changed.") from e
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (str -> tensor). Nothing was loaded or changed.")
    return dict(state)


def _warn_if_two_weight_files(folder: str) -> None:
    """PEFT reads `adapter_model.safetensors` where a folder also holds an `adapter_model.bin` (a later
    `save_pretrained(safe_serialization=False)` into the same folder leaves the other file): say which is read."""
    safe, pickle = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(pickle):
        newer = WEIGHTS_NAME if os.path.getmtime(pickle) > os.path.getmtime(safe) else SAFETENSORS_WEIGHTS_NAME
        warnings.warn(f"{folder} holds both {SAFETENSORS_WEIGHTS_NAME} and {WEIGHTS_NAME} (the newer is {newer}); "
                      f"{SAFETENSORS_WEIGHTS_NAME} is loaded, as PEFT does. Delete the file of the save you do not "
                      "want.", stacklevel=3)


def check_checkpoint_fits_plan(folder: str | None, plan: AdapterPlan, model: nn.Module) -> None:
    """Check that the weights in the adapter folder `folder` fit `plan` (planned on `model`, nothing injected yet);
    raise ValueError / FileNotFoundError naming the file or the modules otherwise. Nothing to check if `folder` is
    None (`APETModel._prepare_model` passes the folder whose config `PeftModel.from_pretrained` or `load_adapter`
    read: `peft_apet.loading.adapter_folder_being_loaded`)."""
    if folder is None:
        return
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(path):
        _warn_if_two_weight_files(folder)
        items = _read_checkpoint(path)
    elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        # `save_pretrained(safe_serialization=False)`: PEFT reads it with torch.load(weights_only=True); so do we.
        path = os.path.join(folder, WEIGHTS_NAME)
        items = _read_pickle_checkpoint(path)
    else:
        raise FileNotFoundError(f"{folder} has an adapter_config.json but no {SAFETENSORS_WEIGHTS_NAME} (nor "
                                f"{WEIGHTS_NAME}).")
    expected = {(m.name, role): t for m in plan.modules.values() for role, t in m.tensors.items()}
    checkpoint = _Checkpoint.from_items(_unpacked(items, expected, path, "Nothing was loaded or changed.").items())
    # trainable token rows (peft_apet.tokens): saved by PEFT's wrapper, which does not exist before injection
    rows = {f"{PEFT_PREFIX}{t.name}.{TOKENS_KEY}": t.shape for t in plan.tokens.values()}
    problems = _problems(expected, checkpoint, lambda key: rows[key] if key in rows else _tensor_shape(
        model, key.removeprefix(PEFT_PREFIX)))
    missing_rows = [key.removeprefix(PEFT_PREFIX) for key in rows if key not in checkpoint.other]
    if missing_rows:
        problems.append(f"it has no trainable token rows {_names(missing_rows)}")
    _raise(path, problems, "Nothing was loaded or changed.")


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[tuple[str, str], nn.Module]:
    """`(module name without base_model.model., role) -> MaskedWeight` of adapter `adapter_name` in `model`."""
    return {(name.removeprefix(PEFT_PREFIX), role): weight for name, module in model.named_modules()
            if isinstance(module, APETLayer) and adapter_name in module.apet_weights
            for role, weight in module.apet_weights[adapter_name].items()}


def _unpacked(state: Mapping[str, object], expected: Mapping[tuple[str, str], object], source: str,
              outcome: str) -> dict:
    """`peft_apet.packing.unpack`, its ValueError worded as every refused checkpoint's."""
    try:
        return unpack(state, expected)
    except ValueError as e:
        _raise(source, [str(e)], outcome)


def check_state_fits_model(model: nn.Module, adapter_name: str,
                           state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a checkpoint state dict (keys without the adapter name) against the adapter `adapter_name` already
    in `model` (a `PeftModel`), before anything is copied; raise ValueError naming the modules otherwise.

    Returns the state dict with packed tensors (`peft_apet.packing`) unpacked to per-module keys, as loading needs.
    Runs after injection: when `PeftModel.from_pretrained` is given `config=` (not read from the folder), it is the
    only check, and a refused checkpoint leaves the (empty) APET layers in the base model.
    """
    merged = merged_layers(model, adapter_name)
    if merged:  # the masks and values would change under the merged delta, which unmerging then fails to remove
        raise ValueError(f"adapter '{adapter_name}' is merged into the base weights ({_names(merged)}): unmerge it "
                         "(`model.unmerge_adapter()`) before loading values into it. No value was loaded.")
    expected = adapter_tensors(model, adapter_name)
    source, outcome = f"loaded into adapter '{adapter_name}'", "No value was loaded."
    state_dict = _unpacked(state_dict, expected, source, outcome)
    _raise(source, _problems(expected, _Checkpoint.from_items(state_dict.items()), lambda key: _tensor_shape(
        model, key)), outcome)
    return state_dict


def check_merge_is_finite(model: nn.Module, adapter_names: list[str]) -> None:
    """Raise ValueError naming the modules whose base weights would hold NaN or inf after merging `adapter_names`;
    nothing is changed."""
    broken = []
    for name, module in model.named_modules():
        if isinstance(module, APETLayer):
            names = [a for a in adapter_names if a in module.apet_weights and a not in module.merged_adapters]
            broken += [f"{name}.{key}" for key in module.broken_merge_targets(names)]
    if broken:
        raise ValueError(f"NaNs or infs detected while merging APET adapters {adapter_names} into {_names(broken)}; "
                         "the adapter seems broken. No base weight was changed.")


def check_nothing_merged(model: nn.Module, action: str) -> None:
    """Raise ValueError if any APET adapter is merged into `model`'s base weights. Mask strategies score the
    pre-trained weights, and a mask cannot change under a merged delta (unmerging would subtract the new one), so
    `action` (e.g. "calibrate_masks") needs every adapter unmerged; nothing is changed."""
    merged = sorted({a for module in model.modules() if isinstance(module, APETLayer) for a in module.merged_adapters})
    if merged:
        raise ValueError(f"{action}: APET adapters {merged} are merged into the base weights, which mask strategies "
                         "would score instead of the pre-trained ones. Call `model.unmerge_adapter()` first (and "
                         "`merge_adapter()` after); nothing was changed.")


def check_adapter_name(model: nn.Module, adapter_name: str, roles: Iterable[str]) -> None:
    """Refuse an adapter name that is also a component of the model's state-dict keys (a module or parameter name,
    an APET role, `values`/`index`). PEFT's `save_pretrained` drops, from every other adapter's file, each key that
    contains `.<name>.` or ends in `.<name>`: such a name would silently cut tensors out of the other adapters."""
    components = {"base_model", "model", "apet_weights", "values", "index", *roles}
    for name, _ in model.named_modules():
        components.update(name.split("."))
    for name, _ in model.named_parameters():
        components.add(name.rsplit(".", 1)[-1])
    if adapter_name in components:
        raise ValueError(
            f"adapter name {adapter_name!r} is also a part of this model's parameter names (a module, parameter or "
            f"APET tensor name): PEFT's save_pretrained drops every key containing '.{adapter_name}.' from the other "
            "adapters' files, which would lose their tensors. Choose another adapter name."
        )


def check_every_tensor_is_saved(model: nn.Module, adapter_name: str, entries: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError if PEFT's adapter state dict of `adapter_name` (`entries`) holds fewer of the adapter's APET
    tensors than `model` has, rather than write a file that cannot be loaded back. Counted, not matched by name, so
    that wrappers which prefix the keys (DDP, FSDP) do not matter."""
    expected = sum(len(module.apet_weights[adapter_name]) for module in model.modules()
                   if isinstance(module, APETLayer) and adapter_name in module.apet_weights)
    marker = f".apet_weights.{adapter_name}."
    found = sum(1 for key in entries if marker in key and key.endswith(".values"))
    if found < expected:
        raise ValueError(f"saving APET adapter {adapter_name!r}: PEFT's state dict holds {found} of its {expected} "
                         "tensors, most likely because another adapter's name is part of their keys (PEFT drops keys "
                         "containing '.<other adapter>.'). Nothing was written.")
