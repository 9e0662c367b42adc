"""Quantized base layers: which ones APET adapts, how it reads and rewrites their weights, and the sparse side path.

Supported: bitsandbytes `Linear4bit` (nf4/fp4, with or without double quantization, any compute dtype) and
`Linear8bitLt`. Their `weight` is packed storage (`Params4bit` of shape `(out * in / 2, 1)` uint8, or int8
`Int8Params`), so APET layers take the logical `(out, in)` from `out_features` / `in_features` and never use the
stored weight in a matmul:

- a discrete (or unmasked) delta on a 4-bit layer, for inputs of more than one token row, is added to the weight
  the layer dequantizes for its matmul anyway (`composes_4bit`, `delta_linear_4bit`): bitsandbytes' own 4-bit
  autograd dequantizes W in forward and again in backward, and so does this path, plus one `index_add` of the k
  values; the dequantized copies are transient, never kept between forward and backward;
- otherwise (8-bit layers, whose matmul is int8; single tokens, which bitsandbytes multiplies without
  dequantizing) it enters as a side path `base(x) + x W~^T` (`functional.add_sparse_delta`), from the k values and
  their indices; the gradient through `base(x)` comes from bitsandbytes' own autograd. The delta enters as k-sparse
  products, or, where the cost model of `routes` picks it, as a transient dense `W~` and its matmul;
- merging dequantizes one layer's weight (`dequantized_weight`), adds the adapter, and requantizes it with the
  layer's own settings (`requantize_`), as PEFT's bnb LoRA layers do; the original quantized parameter is kept while
  merged, so unmerging restores it bit for bit (`stash_weight` / `restore_weight`).

Every other quantized layer type PEFT knows (torchao, HQQ, GPTQ, AWQ, EETQ, optimum-quanto, AQLM, ...) is refused
when the adapter is planned (`check_supported`), before any module is replaced. Detection is by the class's module
path and the weight's type, so those packages need not be installed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

BNB_4BIT = "bitsandbytes 4-bit"
BNB_8BIT = "bitsandbytes 8-bit"
# Module path prefixes of quantized layer classes, and the quantization they stand for.
_QUANTIZED_PACKAGES = {
    "hqq": "HQQ",
    "auto_gptq": "GPTQ",
    "gptqmodel": "GPTQ",
    "optimum.gptq": "GPTQ",
    "awq": "AWQ",
    "eetq": "EETQ",
    "optimum.quanto": "optimum-quanto",
    "quanto": "optimum-quanto",
    "torchao": "torchao",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "fbgemm_gpu": "FBGEMM FP8",
}


def _from_package(cls: type, prefix: str) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module == prefix or module.startswith(prefix + ".")


def quantization_of(module: nn.Module) -> str | None:
    """The quantization of `module`'s weight (`BNB_4BIT`, `BNB_8BIT`, or the name of another scheme), or None for
    a module with a plain floating point weight (or none)."""
    cls = type(module)
    if _from_package(cls, "bitsandbytes"):
        names = {c.__name__ for c in cls.__mro__}
        if "Linear4bit" in names:
            return BNB_4BIT
        if "Linear8bitLt" in names:
            return BNB_8BIT
    for prefix, label in _QUANTIZED_PACKAGES.items():
        if _from_package(cls, prefix):
            return label
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        for prefix, label in _QUANTIZED_PACKAGES.items():
            if _from_package(type(weight), prefix):
                return label
        if _from_package(type(weight), "bitsandbytes"):
            return "bitsandbytes"
        if not (weight.is_floating_point() or weight.is_complex()):
            return f"{weight.dtype} weights"
    elif hasattr(module, "qweight"):  # GPTQ / AWQ / EETQ style packed weights
        return "packed (`qweight`)"
    return None


def is_bnb_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes `Linear4bit` or `Linear8bitLt` (the quantized layers APET adapts)."""
    return quantization_of(module) in (BNB_4BIT, BNB_8BIT)


def check_supported(name: str, module: nn.Module, operation: str) -> None:
    """Raise ValueError if target `name` is a quantized layer APET cannot adapt (see the module docstring)."""
    kind = quantization_of(module)
    if kind is None or kind in (BNB_4BIT, BNB_8BIT):
        return
    raise ValueError(
        f"part '{operation}': target {name} is a {type(module).__module__}.{type(module).__name__} ({kind} "
        "quantization), which peft-apet does not support: its layers would read the packed weight. Quantized bases "
        "are supported with bitsandbytes (BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True); or exclude "
        "this module (`exclude_modules`) or load the model unquantized. Nothing was changed."
    )


# ---------------------------------------------------------------------------------------------- dequantize / requantize
def merge_problem(module: nn.Module) -> str | None:
    """Why the weight of a bitsandbytes layer cannot be dequantized and requantized faithfully, or None."""
    weight = module.weight
    if weight.is_meta:
        return f"its {quantization_of(module)} weight is on the meta device (offloaded?)"
    if quantization_of(module) == BNB_4BIT:
        if getattr(weight, "quant_state", None) is None and getattr(module, "quant_state", None) is None:
            return "its bitsandbytes 4-bit weight has no quantization state"
        return None
    if not weight.is_floating_point() and getattr(weight, "SCB", None) is None and module.state.SCB is None:
        return "its bitsandbytes 8-bit weight has no scale (SCB)"
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A new `(out, in)` tensor holding the dequantized weight of a bitsandbytes layer, in the dtype the weight was
    quantized from (its compute dtype for 8-bit: float16 upward to float32). The layer is not changed."""
    import bitsandbytes as bnb

    problem = merge_problem(module)
    if problem is not None:
        raise ValueError(f"cannot dequantize the weight of this {type(module).__name__}: {problem}.")
    weight = module.weight
    if quantization_of(module) == BNB_4BIT:
        state = getattr(weight, "quant_state", None) or module.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):  # unpack a copy
            data, state = _unpacked_4bit(data, state)
        return bnb.functional.dequantize_4bit(data, state)
    if weight.is_floating_point():  # has_fp16_weights=True: a plain weight
        return weight.detach().clone()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


# Attribute of a 4-bit weight's quantization state holding its copy from before bitsandbytes repacked it: kept on the
# state object, which belongs to one weight (a merge or unmerge swaps weights, and with them their states).
_KEPT = "_apet_state_before_repacking"


def _unpacked_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """The standard 4-bit storage and a new quantization state for weight storage `data` that bitsandbytes repacked
    for its CPU AVX512-BF16 inference kernel (`state.packing_format_for_cpu`); `data` and `state` are not changed.

    bitsandbytes' own inverse leaves a plain absmax in the packed layout (wrong unless out == blocksize) and
    requantizes a double-quantized one: the packed absmax values (bf16, the ones its kernel multiplies by) are kept
    instead, in row-major block order, unquantized, so the unpacked weight dequantizes to what the kernel used."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    packed_absmax = state.absmax  # (in / blocksize, out) bf16 in the packed layout
    state = copy.copy(state)
    state.original_nested = False  # so that the inverse does not requantize the absmax replaced below
    data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax, state.nested = packed_absmax.T.reshape(-1).float(), False
    return data, state


def _unpack_in_place(module: nn.Module) -> bool:
    """Return a repacked 4-bit layer's weight to the standard storage, updating its quantization state object in
    place (as bitsandbytes' repacking does), so every holder of that object sees the change; whether it was
    repacked. The 4-bit codes come back unchanged; the state is the one `_keep_state_before_repacking` kept, so the
    layer is bit for bit what it was before the evaluation. Without one (repacked before APET was attached), the
    absmax stays the repacking's bf16 values (`_unpacked_4bit`)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False) or quantization_of(module) != BNB_4BIT:
        return False
    kept = state.__dict__.pop(_KEPT, None)
    data, unpacked = _unpacked_4bit(module.weight.data, state)
    module.weight.data = data
    state.__dict__.clear()
    state.__dict__.update((kept or unpacked).__dict__)
    state.packing_format_for_cpu = False  # as bitsandbytes' inverse leaves it (some of its code reads it directly)
    return True


def _keep_state_before_repacking(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: where bitsandbytes' `Linear4bit.forward` is about to repack the weight for its CPU kernel
    (its own conditions), keep a shallow copy of the quantization state first: the repacking replaces the absmax (and
    a double-quantized one's nested state) with bf16 values in another layout, in place, and only this copy lets
    `_unpack_in_place` restore the original. A few small tensors per layer, held while the weight is repacked."""
    state = getattr(module.weight, "quant_state", None)
    x = args[0] if args else None
    if (state is not None and not getattr(state, "packing_format_for_cpu", False) and not module.training
            and getattr(module, "support_avx512bf16_for_cpu", False) and isinstance(x, torch.Tensor)
            and x.device.type == "cpu" and not x.requires_grad):
        state.__dict__.pop(_KEPT, None)
        setattr(state, _KEPT, copy.copy(state))


def _unpack_before_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: bitsandbytes' own save unpacks a repacked weight in place with its faulty inverse (the
    absmax left in the packed layout, a double-quantized one requantized), corrupting the weight for good; unpack it
    correctly first."""
    _unpack_in_place(module)


def guard_cpu_repacking(model: nn.Module) -> None:
    """Give every bitsandbytes 4-bit layer of `model` (adapted or not), once, a forward pre-hook that keeps its
    quantization state before bitsandbytes repacks the weight (`_keep_state_before_repacking`), and a state-dict
    pre-hook that unpacks a repacked weight correctly before bitsandbytes' save does it wrongly
    (`_unpack_before_saving`). Not covered: bitsandbytes' `Params4bit.cuda()`, which also unpacks with that
    inverse: move a model to the GPU before evaluating it on a CPU, or after `train()`."""
    for module in model.modules():
        if quantization_of(module) == BNB_4BIT and not getattr(module, "_apet_guards_repacking", False):
            module.register_forward_pre_hook(_keep_state_before_repacking)
            module.register_state_dict_pre_hook(_unpack_before_saving)
            module._apet_guards_repacking = True


def unpack_cpu_repacked_4bit_(model: nn.Module) -> list[str]:
    """Return every bitsandbytes 4-bit layer of `model` that bitsandbytes repacked for its CPU inference kernel to
    the standard storage, in place; returns their names.

    On CPUs with AVX512-BF16 `Linear4bit.forward` repacks its weight, for good, at the first eval-mode forward of an
    input that needs no gradient; a later training forward then multiplies through bitsandbytes' inference op, which
    has no autograd: gradients no longer flow back through the layer (`tests/test_quantized.py`: after one
    evaluation no adapter tensor of a two-layer Llama got a gradient, with PEFT's own QLoRA as with APET).
    Unpacked, the layer is bit for bit what it was before the evaluation (`_unpack_in_place`) and trains as then;
    it repacks at the next evaluation."""
    return [name for name, module in model.named_modules() if _unpack_in_place(module)]


@torch.no_grad()
def requantize_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the weight of a bitsandbytes layer by `weight` `(out, in)`, quantized with the layer's settings."""
    import bitsandbytes as bnb

    old = module.weight
    if quantization_of(module) == BNB_4BIT:
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        # the dequantized weight's dtype is the one it was quantized from (never the CPU-repacked state's bf16)
        kwargs.update(requires_grad=False, bnb_quantized=False, quant_state=None)
        module.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)
        if hasattr(module, "quant_state"):
            module.quant_state = module.weight.quant_state
        return
    module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                      has_fp16_weights=old.has_fp16_weights).to(old.device)
    module.state.reset_grads()


def stash_weight(module: nn.Module) -> dict[str, Any]:
    """What `restore_weight` needs to put the current quantized weight back bit for bit (references, no copies),
    and a copy of the bias (a merge adds to it in place; subtracting again would not restore it bit for bit)."""
    bias = getattr(module, "bias", None)
    stash: dict[str, Any] = {"weight": module.weight, "bias": None if bias is None else bias.data.clone()}
    if quantization_of(module) == BNB_4BIT:
        stash["quant_state"] = getattr(module, "quant_state", None)
    else:
        stash["CB"], stash["SCB"] = module.state.CB, module.state.SCB
    return stash


def restore_weight(module: nn.Module, stash: dict[str, Any]) -> None:
    """Put back what `stash_weight` took: the quantized weight and its state, and the bias's values (a bias the
    merge created, absent from the stash, is the caller's to remove)."""
    module.weight = stash["weight"]
    if stash["bias"] is not None:
        module.bias.data = stash["bias"]
    if quantization_of(module) == BNB_4BIT:
        if hasattr(module, "quant_state"):
            module.quant_state = stash["quant_state"]
    else:
        module.state.reset_grads()
        module.state.CB, module.state.SCB = stash["CB"], stash["SCB"]


# ---------------------------------------------------------------------------------------------- deltas in forward
def composes_4bit(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a delta on bitsandbytes 4-bit layer `module` (the caller checks the kind, once) runs on the layer's
    dequantized weight (`delta_linear_4bit`) rather than as the side path: where the layer's own forward on `x`
    `(..., in)` would dequantize its weight for a matmul anyway, i.e. more than one token row, a compute dtype set,
    and not bitsandbytes' CPU inference kernel, which multiplies without dequantizing: taken for a weight repacked
    for it, and (repacking it first) on CPUs with AVX512-BF16 for an input that needs no gradient in eval mode, the
    conditions of `Linear4bit.forward`."""
    if getattr(module, "compute_dtype", None) is None:
        return False
    if (x.device.type == "cpu" and getattr(module, "support_avx512bf16_for_cpu", False) and not module.training
            and not x.requires_grad):
        return False
    state = getattr(module.weight, "quant_state", None)
    return state is not None and not getattr(state, "packing_format_for_cpu", False) and x.numel() > x.shape[-1]


def delta_linear_4bit(module: nn.Module, x: torch.Tensor, deltas: list, values: list[torch.Tensor]) -> torch.Tensor:
    """What bitsandbytes' `Linear4bit.forward` computes, `x dequantize(W)^T + b` in the compute dtype, with the
    deltas added to the dequantized weight before its matmul (`functional.dequantized_delta_linear`); the output in
    `x`'s dtype, as the layer's own. Only where `composes_4bit(module, x)`."""
    import bitsandbytes as bnb

    from .functional import dequantized_delta_linear

    weight, state, dtype = module.weight, module.weight.quant_state, module.compute_dtype
    bias = None if module.bias is None else module.bias.to(dtype)
    out = dequantized_delta_linear(x.to(dtype), lambda: bnb.functional.dequantize_4bit(weight.data, state), bias,
                                   deltas, values)
    return out.to(x.dtype)


def float_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype for tensors created beside a quantized weight (e.g. a new bias): the 4-bit compute dtype,
    else float32."""
    return getattr(module, "compute_dtype", None) or torch.float32


def check_quantized_mergeable(model: nn.Module) -> None:
    """Raise ValueError naming the modules whose quantized weight cannot be merged into (`merge_problem`), before
    any weight is touched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    problems = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and is_bnb_quantized(module.get_base_layer()):
            problem = merge_problem(module.get_base_layer())
            if problem is not None:
                problems.append(f"{name}: {problem}")
    if problems:
        raise ValueError(f"cannot merge into quantized base weights: {problems[:5]}; a merge needs to dequantize and "
                         "requantize them. No weight was changed; keep the adapter unmerged.")
