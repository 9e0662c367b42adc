"""Facts about the modules of a base model that APET adapts: linear-like layers (including transformers' `Conv1D`,
whose weight is stored `(in, out)`), their shapes and biases, and the pre-trained tensors a part adds to.

A leaf of the package: it imports only `quantized` (itself a leaf), for the logical shape and dequantized weight of
bitsandbytes layers.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .quantized import dequantized_weight, is_bnb_quantized


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear layer whose weight is stored `(in, out)`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of a linear-like module."""
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def output_features(module: nn.Module) -> int | None:
    """Size of the last dimension of the module's output, where it can be read off the module."""
    if is_linear(module):
        return linear_shape(module)[0]
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.dim() == 1:
        return bias.numel()
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1]
    weight = getattr(module, "weight", None)  # norms without bias (RMSNorm, T5LayerNorm)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1 and "norm" in type(module).__name__.lower():
        return weight.numel()
    return None


def has_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return isinstance(bias, nn.Parameter) and bias.dim() == 1


def base_tensor(base_layer: nn.Module, role: str) -> torch.Tensor | None:
    """The pre-trained tensor a `delta` or `bias` part adds to, in the part's layout: the `(out, in)` weight
    (transposed for transformers' Conv1D; a dequantized copy of this one layer's weight for bitsandbytes layers) or
    the `(features,)` bias; None for a module without a bias."""
    if role == "delta":
        if is_bnb_quantized(base_layer):
            return dequantized_weight(base_layer)
        return base_layer.weight.T if is_conv1d(base_layer) else base_layer.weight
    bias = getattr(base_layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def base_layer_of(model: nn.Module, name: str) -> nn.Module:
    """The module `name` of `model` as it was before APET (or any PEFT tuner) wrapped it."""
    module = model.get_submodule(name)
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    """Where `tensor`'s data lives (device, storage address), or None where that says nothing (meta tensors, or
    tensor subclasses without one storage)."""
    if tensor.device.type == "meta":
        return None
    try:
        return str(tensor.device), tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
