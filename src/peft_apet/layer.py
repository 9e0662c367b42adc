"""APET tuner layers: where masked tensors enter a module's forward pass.

- `Linear` wraps `nn.Linear` / transformers `Conv1D` and hosts every operation on it:
  `y = x (W + W~delta)^T + b  +  lora(x)  +  W~bias`, then `y + σ(y D~^T) U~^T` (the plug-in sees the
  adapted output, as a Houlsby adapter placed after the projection does).
- `OutputLayer` wraps any other module with a feature output (LayerNorm, RMSNorm) for `bias` and `adapter`.
- `PromptEmbedding` wraps the input embedding: ids at and above the vocabulary size are virtual tokens,
  looked up in the prompt table (the tuner prepends them, see `peft_apet.prompt`).

Each layer keeps per-adapter state in `apet_weights[adapter][role]` (`MaskedWeight`s) and
`apet_settings[adapter]` (scalars from the plan). What each operation does in the forward pass and when merging is
its `Operation`'s hooks (`peft_apet.operations`); the layers run them in table order and never name an operation.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .functional import add_sparse_delta, masked_delta_linear, prepare_layouts
from .masked_weight import MaskedWeight, aligned_indices
from .masks import learnable_pair_entries
from .modules import is_conv1d, linear_shape, output_features
from .operations import MERGEABLE_OPERATIONS, OPERATION_OF_ROLE, PAIRS, operations_in
from .plan import ModulePlan, TensorPlan
from .quantized import (
    BNB_4BIT,
    composes_4bit,
    delta_linear_4bit,
    dequantized_weight,
    float_dtype,
    is_bnb_quantized,
    quantization_of,
    requantize_,
    restore_weight,
    stash_weight,
)


class APETLayer(BaseTunerLayer):
    """State and lifecycle shared by all APET layers."""

    adapter_layer_names = ("apet_weights",)
    other_param_names = ("apet_settings", "apet_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.apet_weights = nn.ModuleDict({})
        self.apet_settings: dict[str, dict[str, Any]] = {}
        self.apet_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._created_bias = False
        self._quantized_stash: dict[str, Any] | None = None  # the quantized weight before merging (quantized.py)

    def update_layer(self, adapter_name: str, plan: ModulePlan, init_weights: bool = True,
                     init_values: dict[str, torch.Tensor] | None = None, inference_mode: bool = False) -> None:
        """Create the tensors of `plan` for `adapter_name` (on the base layer's device and dtype)."""
        init_values = init_values or {}
        indices = aligned_indices(plan.tensors)
        self.apet_weights[adapter_name] = nn.ModuleDict(
            {role: MaskedWeight(t, init_weights, init_values.get(role), indices.get(role))
             for role, t in plan.tensors.items()}
        )
        self.apet_settings[adapter_name] = dict(plan.settings)
        for op in operations_in(plan.tensors):
            dropout = op.dropout(plan.settings)
            if dropout is not None:
                self.apet_dropout[adapter_name] = dropout
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._prepare_quantized_layouts(list(self.apet_weights[adapter_name].values()))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _prepare_quantized_layouts(self, weights: list[MaskedWeight]) -> None:
        """On bitsandbytes layers, build the index arrays of `weights` now, not in forward (`prepare_layouts`)."""
        base = self.get_base_layer()
        if is_bnb_quantized(base):
            prepare_layouts(weights, input_gradients=quantization_of(base) != BNB_4BIT)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT's, except on bitsandbytes layers: they report their compute dtype (e.g. bf16), and casting there
        would round float32 values; PEFT casts them back at creation, but not after a `low_cpu_mem_usage` load, so
        such a reload lost precision. On those layers only the device follows the base layer."""
        base = self.get_base_layer()
        if not is_bnb_quantized(base):
            return super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = device if device is not None else self._get_base_layer_device_and_dtype(base)[0]
        if target is None or adapter_name not in self.apet_weights:
            return
        weights = self.apet_weights[adapter_name]
        if not any(p.is_meta for p in weights.parameters()):
            self.apet_weights[adapter_name] = weights.to(target)

    def replace_mask(self, adapter_name: str, tensor: TensorPlan, init_weights: bool = True) -> None:
        """Give tensor `tensor.role` of `adapter_name` the mask `tensor.index` (chosen by a strategy) with
        `tensor.num_entries` entries, and initial values; same device, dtype, trainability and training mode as
        before."""
        old = self.apet_weights[adapter_name][tensor.role]
        new = MaskedWeight(tensor, init_weights).to(device=old.values.device, dtype=old.values.dtype)
        new.values.requires_grad_(old.values.requires_grad)
        new.train(old.training)
        self.apet_weights[adapter_name][tensor.role] = new
        self._prepare_quantized_layouts([new])

    def operations(self, adapter_name: str) -> list[str]:
        """Operations `adapter_name` has on this layer, e.g. `["delta", "lora"]`."""
        roles = self.apet_weights[adapter_name] if adapter_name in self.apet_weights else {}
        return list(dict.fromkeys(OPERATION_OF_ROLE[r].name for r in roles))

    def learnable_entries(self, adapter_name: str) -> dict[str, int]:
        """By role, the trainable entries of `adapter_name` that can receive a gradient: all of them, except in a
        masked two-matrix path, where an entry learns only if its rank unit has a trainable entry in the other
        matrix (`peft_apet.masks.learnable_pair_entries`)."""
        weights = self.apet_weights[adapter_name]
        out = {role: weight.num_entries for role, weight in weights.items()}
        for first, second in PAIRS:
            if first in weights and weights[first].mask is not None:
                a, b = weights[first], weights[second]
                out[first], out[second] = learnable_pair_entries(a.flat_indices() // a.shape[1],
                                                                 b.flat_indices() % b.shape[1])
        return out

    def _active_weights(self) -> list[tuple[str, nn.ModuleDict]]:
        return [(a, self.apet_weights[a]) for a in self.active_adapters if a in self.apet_weights]

    def _check_mergeable(self, adapter_names: list[str]) -> None:
        for name in adapter_names:
            blocked = [op for op in self.operations(name) if op not in MERGEABLE_OPERATIONS]
            if blocked:
                raise ValueError(
                    f"APET adapter '{name}' has parts {blocked} that cannot be merged into the base weights "
                    f"(they are non-linear or change the input sequence); mergeable parts are "
                    f"{', '.join(sorted(MERGEABLE_OPERATIONS))}."
                )

    def _after_base(self, x: torch.Tensor, result: torch.Tensor,
                    active: list[tuple[str, nn.ModuleDict]]) -> torch.Tensor:
        """`result` (the base computation) with the active adapters applied: first every adapter's
        `Operation.after_base`, then, adapter by adapter, each operation's `Operation.on_output` in table order."""
        for name, weights in active:
            for op in operations_in(weights):
                result = op.after_base(x, result, weights, self.apet_settings[name], self.training)
        for name, weights in active:
            settings, dropout = self.apet_settings[name], self.apet_dropout[name] if name in self.apet_dropout else None
            for op in operations_in(weights):
                result = op.on_output(x, result, weights, settings, dropout, self.training)
        return result

    # ------------------------------------------------------------------ merging
    def _bias_target(self, create: bool) -> torch.Tensor | None:
        base = self.get_base_layer()
        if getattr(base, "bias", None) is None:
            if not hasattr(base, "bias") or not isinstance(self, Linear):
                raise ValueError(f"cannot merge an APET bias into {type(base).__name__}, which has no bias.")
            if not create:
                return None
            weight = self.get_base_weight()
            base.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self._float_dtype(), device=weight.device),
                                     requires_grad=False)
            self._created_bias = True
        return base.bias.data

    def _float_dtype(self) -> torch.dtype:
        weight = self.get_base_weight()
        return weight.dtype if weight.is_floating_point() else float_dtype(self.get_base_layer())

    def _merge_targets(self, name: str, create_bias: bool, with_weight: bool = True) -> dict[str, torch.Tensor]:
        """The base tensors adapter `name` merges into: `weight` as `(out, in)` (a dequantized copy for a quantized
        base) and/or `bias` (zeros standing in for a bias the base layer does not have yet, unless `create_bias`)."""
        into = {op.merges_into for op in operations_in(self.apet_weights[name])}
        targets = {}
        if with_weight and "weight" in into:
            base = self.get_base_layer()
            targets["weight"] = dequantized_weight(base) if is_bnb_quantized(base) else self.weight_out_in().data
        if "bias" in into:
            bias = self._bias_target(create=create_bias)
            targets["bias"] = bias if bias is not None else self.get_base_weight().new_zeros(
                self.out_features, dtype=self._float_dtype())
        return targets

    def _add_adapter_to(self, name: str, targets: dict[str, torch.Tensor], sign: float) -> None:
        """`targets += sign * (what adapter `name` adds to the base weight and bias)`, in place."""
        weights = self.apet_weights[name]
        for op in operations_in(weights):  # unmerging a quantized layer: no "weight" (it is restored instead)
            if op.merges_into in targets:
                op.add_to_base(targets[op.merges_into], weights, self.apet_settings[name], sign)

    def broken_merge_targets(self, adapter_names: list[str]) -> list[str]:
        """The base tensors (`weight`, `bias`) that would hold NaN or inf after merging `adapter_names` in turn;
        computed on copies, nothing is changed."""
        merged: dict[str, torch.Tensor] = {}
        for name in adapter_names:
            targets = self._merge_targets(name, create_bias=False)
            for key, target in targets.items():
                merged.setdefault(key, target.clone())
            self._add_adapter_to(name, {key: merged[key] for key in targets}, 1.0)
        return [key for key, t in merged.items() if not torch.isfinite(t).all()]

    def _merge_one(self, name: str, sign: float, safe_merge: bool, with_weight: bool = True) -> None:
        if safe_merge:
            broken = self.broken_merge_targets([name])
            if broken:
                raise ValueError(f"NaNs or infs detected while merging APET adapter '{name}' into the base "
                                 f"{broken}; the adapter seems broken. The base weights were left unchanged.")
        targets = self._merge_targets(name, create_bias=sign > 0, with_weight=with_weight)
        self._add_adapter_to(name, targets, sign)
        base = self.get_base_layer()
        if "weight" in targets and is_bnb_quantized(base):
            requantize_(base, targets["weight"])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or given) adapters' lora, bias and delta parts into the base weights."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._check_mergeable(adapter_names)
        base = self.get_base_layer()
        if is_bnb_quantized(base) and not self.merged_adapters:
            warnings.warn(f"Merging APET adapters into a {quantization_of(base)} weight requantizes it: outputs may "
                          "differ from the unmerged model by rounding errors (unmerge restores the original).",
                          stacklevel=2)
            self._quantized_stash = stash_weight(base)
        for name in adapter_names:
            if name in self.apet_weights:
                self._merge_one(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        stash, self._quantized_stash = self._quantized_stash, None
        if stash is not None:  # the quantized weight and the bias from before the merge, bit for bit
            self.merged_adapters.clear()
            restore_weight(self.get_base_layer(), stash)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.apet_weights:
                self._merge_one(name, -1.0, safe_merge=False)
        if self._created_bias:
            self.get_base_layer().bias = None
            self._created_bias = False

    def weight_out_in(self) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no linear weight")

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense `(out, in)` change of the base weight made by the adapter's lora and delta parts."""
        weights = self.apet_weights[adapter_name]
        device = next(iter(weights.values())).values.device
        delta = torch.zeros((self.out_features, self.in_features), dtype=torch.float32, device=device)
        for op in operations_in(weights):
            if op.merges_into == "weight":
                op.add_to_base(delta, weights, self.apet_settings[adapter_name], 1.0)
        return delta


def merged_layers(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of `model`'s APET layers into whose base weights `adapter_name` is merged."""
    return [name for name, module in model.named_modules()
            if isinstance(module, APETLayer) and adapter_name in module.merged_adapters]


class _WrappedLayer(nn.Module, APETLayer):
    """Common constructor of the concrete layers: wrap `base_layer` and create `adapter_name` from its plan."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, plan: ModulePlan, **kwargs: Any) -> None:
        super().__init__()
        APETLayer.__init__(self, base_layer)
        self._read_base_layer()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, plan, **kwargs)

    def _read_base_layer(self) -> None:
        """Attributes the layer takes from its base layer before any adapter is created."""

    def __repr__(self) -> str:
        return "apet." + super().__repr__()


class Linear(_WrappedLayer):
    """APET on `nn.Linear` or transformers `Conv1D` (weights handled in the logical `(out, in)` layout)."""

    def _read_base_layer(self) -> None:
        self.out_features, self.in_features = linear_shape(self.get_base_layer())
        # read once: forward stays traceable
        self._bnb_quantized = is_bnb_quantized(self.get_base_layer())
        self._bnb_4bit = quantization_of(self.get_base_layer()) == BNB_4BIT

    def weight_out_in(self) -> torch.Tensor:
        base = self.get_base_layer()
        if self._bnb_quantized:
            raise ValueError(f"the base weight of this layer is {quantization_of(base)} storage, not an (out, in) "
                             "matrix; read it with peft_apet.quantized.dequantized_weight(layer.get_base_layer()).")
        return base.weight.T if is_conv1d(base) else base.weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_weights()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        folded = [pair for name, weights in active for op in operations_in(weights)
                  for pair in op.folded(weights, self.apet_settings[name], self.training)]
        sparse, values = [delta for delta, _ in folded], [v for _, v in folded]
        if sparse and self._bnb_4bit and composes_4bit(self.get_base_layer(), x):
            # on the weight the 4-bit layer dequantizes anyway; hooks on the base layer do not run on this path
            result = delta_linear_4bit(self.get_base_layer(), x, sparse, values)
        elif sparse and self._bnb_quantized:  # a side path: never reads the packed weight
            result = add_sparse_delta(self.base_layer(x, *args, **kwargs), x, sparse, values)
        elif sparse:
            # Composes the weight and calls F.linear: hooks on the base layer do not run on this path.
            result = masked_delta_linear(x, self.weight_out_in(), self.get_base_layer().bias, sparse, values)
        else:
            result = self.base_layer(x, *args, **kwargs)
        return self._after_base(x, result, active)


class OutputLayer(_WrappedLayer):
    """APET `bias` and `adapter` parts on a module that is not linear (LayerNorm, RMSNorm, ...).

    `in_features` and `out_features` (as on PEFT's layers) are both the size of the module's last dimension: these
    modules map features to as many features.
    """

    def _read_base_layer(self) -> None:
        self.in_features = self.out_features = output_features(self.get_base_layer())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active_weights()
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not active:
            return result
        return self._after_base(x, result, active)


class PromptEmbedding(_WrappedLayer):
    """The input embedding, extended by virtual tokens: id `vocab_size + j` embeds to row `j` of the prompt.

    Like PEFT's `lora.Embedding`: `in_features` is the vocabulary size and `out_features` the embedding width.
    """

    def _read_base_layer(self) -> None:
        self.in_features, self.out_features = self.num_embeddings, self.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.get_base_layer().num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.get_base_layer().embedding_dim

    def active_prompt(self) -> str | None:
        """The adapter whose prompt is used now, or None (adapters disabled or no active prompt)."""
        if self.disable_adapters:
            return None
        names = [a for a, w in self._active_weights() if "prompt" in w]
        if len(names) > 1:
            raise ValueError(f"adapters {names} both have a prompt; activate one of them at a time.")
        return names[0] if names else None

    def prompt_table(self, adapter_name: str) -> torch.Tensor:
        """The `(num_virtual_tokens, embedding_dim)` prompt of `adapter_name`."""
        return self.apet_weights[adapter_name]["prompt"].dense()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self._check_mergeable(check_adapters_to_merge(self, adapter_names))

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active_prompt()
        vocab_size = self.num_embeddings
        if name is None:
            return self.base_layer(input_ids, *args, **kwargs)
        virtual = input_ids >= vocab_size
        embeds = self.base_layer(input_ids.masked_fill(virtual, 0), *args, **kwargs)
        prompt = self.prompt_table(name)
        position = (input_ids - vocab_size).clamp(0, prompt.shape[0] - 1)
        return torch.where(virtual.unsqueeze(-1), prompt[position].to(embeds.dtype), embeds)
