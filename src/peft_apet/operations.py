"""The operations of APET, one `Operation` object each: everything the planner and the layers need to know about
an operation, and how a layer applies it.

Each entry of `OPERATIONS` states:
- `roles`: the tensors it owns, in allocation order; `init`: how each starts ("zeros" keeps the adapter an identity
  at init, "kaiming_uniform" as `nn.Linear` / LoRA A, "normal" as prompt embeddings);
- `acts_on`: the modules it can target: "linear" (`nn.Linear` / Conv1D), "features" (any module whose output size is
  known: linear layers and norms) or "input_embedding";
- `shapes(part, module)` and `settings(part, module)`: each tensor's logical shape, and the scalars the layer reads;
- `paired`: two matrices, the first holding rank (bottleneck) unit j on row j, the second on column j (their
  masks may be drawn together: `peft_apet.masks.aligned_pair_masks`); the zero-initialised one comes second;
- `scored`: a mask strategy can rank its entries (an additive change that starts at zero on top of a pre-trained
  tensor, so that a score taken at the pre-trained model says what training an entry would do);
- `merges_into`: the base tensor (`"weight"` `(out, in)` or `"bias"`) its change folds into, or None: not mergeable
  (a non-linear plug-in, a prompt that changes the input sequence);
- hooks, in the order a layer runs them: `folded(weights, settings, training)` (tensors the base matmul of a linear
  layer adds to its weight, see `functional.masked_delta_linear`), `after_base(x, result, weights, settings,
  training)` (for every active adapter, right after the base computation), `on_output(x, result, weights, settings,
  dropout, training)` (per adapter, in table order), and `add_to_base(target, weights, settings, sign)` when merging.
  `weights` maps role to `MaskedWeight`; `training` is the layer's mode. The forward hooks of delta and bias take
  their values through `dropped_values` (the parts' `delta_dropout`); merging reads the values themselves.

The table is in the order the layer applies operations: a delta changes the base weight, LoRA and bias add to the
output, and the adapter plug-in sees the output they made. The maths is in `peft_apet.functional`, imported inside the
hooks: the config reads `MERGEABLE_OPERATIONS` and friends from here, and validating a config should not load the
autograd kernels. This module imports only `modules` (module facts, a leaf but for `quantized`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import linear_shape, output_features


def dropped_values(weight: nn.Module, p: float, training: bool) -> torch.Tensor:
    """The `(k,)` values of `weight` (a `MaskedWeight`) that a forward pass uses: in training with `p > 0`, each entry
    dropped with probability `p` and the kept ones scaled by `1 / (1 - p)` (inverted dropout on the entries of the
    delta, as SpaRTA's `W + dropout(1) ⊙ Δ`; O(k), no dense mask), so only kept entries get a gradient. Otherwise the
    values themselves: eval outputs are those of a model without dropout, bit for bit."""
    return F.dropout(weight.values, p) if training and p > 0 else weight.values


class Operation:
    """One operation of the paper; subclasses fill in the facts and override the hooks they need."""

    name: str = ""
    roles: tuple[str, ...] = ()
    init: dict[str, str] = {}
    acts_on: str = "features"
    paired: bool = False
    scored: bool = False
    merges_into: str | None = None

    @property
    def mergeable(self) -> bool:
        return self.merges_into is not None

    def shapes(self, part: Any, module: nn.Module) -> dict[str, tuple[int, ...]]:
        """Logical shape of each tensor, by role, for `part` on `module` (a base module it targets)."""
        raise NotImplementedError

    def settings(self, part: Any, module: nn.Module) -> dict[str, Any]:
        """Scalars the layer reads in `apet_settings[adapter]` (names unique across operations)."""
        return {}

    def dropout(self, settings: dict[str, Any]) -> nn.Module | None:
        """The layer's input dropout for this adapter, if the operation has one."""
        return None

    def folded(self, weights: nn.ModuleDict, settings: dict[str, Any],
               training: bool) -> list[tuple[nn.Module, torch.Tensor]]:
        """The `MaskedWeight`s of `(out, in)` a linear layer's base matmul adds to its weight (`functional`'s
        `masked_delta_linear`, or `add_sparse_delta` on a quantized base), each with the `(k,)` values to use."""
        return []

    def after_base(self, x: torch.Tensor, result: torch.Tensor, weights: nn.ModuleDict, settings: dict[str, Any],
                   training: bool) -> torch.Tensor:
        """The base output `result` `(..., out)` for input `x` `(..., in)`, changed right after the base computation
        (run for every active adapter before any `on_output`)."""
        return result

    def on_output(self, x: torch.Tensor, result: torch.Tensor, weights: nn.ModuleDict, settings: dict[str, Any],
                  dropout: nn.Module | None, training: bool) -> torch.Tensor:
        """The layer output `result` `(..., out)`, changed by this operation of one adapter (`settings`: its
        `apet_settings`; `dropout`: its input dropout, if any)."""
        return result

    def add_to_base(self, target: torch.Tensor, weights: nn.ModuleDict, settings: dict[str, Any],
                    sign: float) -> None:
        """`target += sign * (this operation's change of the base tensor `merges_into`)`, in place."""
        raise ValueError(f"a {self.name} part cannot be merged into the base weights.")

    def __repr__(self) -> str:
        return f"Operation({self.name!r})"


class Delta(Operation):
    """`f(h; W + W~)`: a masked change of the base weight (discrete or unmasked: folded into the matmul)."""

    name, roles, init, acts_on = "delta", ("delta",), {"delta": "zeros"}, "linear"
    scored, merges_into = True, "weight"

    def shapes(self, part, module):
        return {"delta": linear_shape(module)}

    def settings(self, part, module):
        return {"delta_dropout": part.delta_dropout}

    def folded(self, weights, settings, training):
        delta = weights["delta"]
        return [] if delta.mask == "adjacent" else [(delta, dropped_values(delta, settings["delta_dropout"], training))]

    def after_base(self, x, result, weights, settings, training):
        from .functional import adjacent_delta_output  # lazily: see the module docstring

        delta = weights["delta"]
        if delta.mask != "adjacent":
            return result
        return adjacent_delta_output(x, delta, result, dropped_values(delta, settings["delta_dropout"], training))

    def add_to_base(self, target, weights, settings, sign):
        weights["delta"].add_to_(target, alpha=sign)


class Lora(Operation):
    """`f(h) + a·h·W~3·W~4`: a low-rank path beside the base weight."""

    name, roles, acts_on = "lora", ("lora_A", "lora_B"), "linear"
    init = {"lora_A": "kaiming_uniform", "lora_B": "zeros"}
    paired, merges_into = True, "weight"

    def shapes(self, part, module):
        out_f, in_f = linear_shape(module)
        return {"lora_A": (part.r, in_f), "lora_B": (out_f, part.r)}

    def settings(self, part, module):
        return {"lora_scaling": part.lora_alpha / part.r, "lora_dropout": part.lora_dropout}

    def dropout(self, settings):
        p = float(settings["lora_dropout"])
        return nn.Dropout(p) if p > 0 else nn.Identity()

    def on_output(self, x, result, weights, settings, dropout, training):
        from .functional import lora_output  # lazily: see the module docstring

        return result + lora_output(x, weights["lora_A"], weights["lora_B"], settings["lora_scaling"],
                                    dropout).to(result.dtype)

    def add_to_base(self, target, weights, settings, sign):
        delta = settings["lora_scaling"] * (weights["lora_B"].dense() @ weights["lora_A"].dense())
        target += sign * delta.detach().to(target.dtype)


class Bias(Operation):
    """`f(h) + W~1`: a change of the output bias (BitFit)."""

    name, roles, init = "bias", ("bias",), {"bias": "zeros"}
    scored, merges_into = True, "bias"

    def shapes(self, part, module):
        return {"bias": (output_features(module),)}

    def settings(self, part, module):
        return {"bias_dropout": part.delta_dropout}

    def on_output(self, x, result, weights, settings, dropout, training):
        bias = weights["bias"]
        return result + bias.dense(dropped_values(bias, settings["bias_dropout"], training)).to(result.dtype)

    def add_to_base(self, target, weights, settings, sign):
        weights["bias"].add_to_(target, alpha=sign)


class Adapter(Operation):
    """`f(h) + σ(f(h)·W~5)·W~6`: a bottleneck plug-in on the module's output (Houlsby)."""

    name, roles = "adapter", ("adapter_down", "adapter_up")
    init = {"adapter_down": "kaiming_uniform", "adapter_up": "zeros"}
    paired = True

    def shapes(self, part, module):
        features = output_features(module)
        return {"adapter_down": (part.bottleneck, features), "adapter_up": (features, part.bottleneck)}

    def settings(self, part, module):
        return {"adapter_activation": part.activation}

    def on_output(self, x, result, weights, settings, dropout, training):
        from .functional import adapter_output  # lazily: see the module docstring

        return adapter_output(result, weights["adapter_down"], weights["adapter_up"], settings["adapter_activation"])


class Prompt(Operation):
    """`f([W~2; X])`: virtual tokens prepended to the input (`peft_apet.layer.PromptEmbedding`, `peft_apet.prompt`)."""

    name, roles, init, acts_on = "prompt", ("prompt",), {"prompt": "normal"}, "input_embedding"

    def shapes(self, part, module):
        return {"prompt": (part.num_virtual_tokens, module.embedding_dim)}

    def settings(self, part, module):
        return {"num_virtual_tokens": part.num_virtual_tokens, "vocab_size": module.num_embeddings}


OPERATIONS: dict[str, Operation] = {op.name: op for op in (Delta(), Lora(), Bias(), Adapter(), Prompt())}
OPERATION_OF_ROLE: dict[str, Operation] = {role: op for op in OPERATIONS.values() for role in op.roles}
# Tensors each operation owns, in allocation order.
OPERATION_ROLES = {name: op.roles for name, op in OPERATIONS.items()}
MERGEABLE_OPERATIONS = tuple(name for name, op in OPERATIONS.items() if op.mergeable)
SCORED_OPERATIONS = tuple(name for name, op in OPERATIONS.items() if op.scored)
PAIRED_OPERATIONS = tuple(name for name, op in OPERATIONS.items() if op.paired)
# The two matrices of each pair: (first, second) roles.
PAIRS = tuple(op.roles for op in OPERATIONS.values() if op.paired)


def operations_in(weights: dict[str, Any] | nn.ModuleDict) -> list[Operation]:
    """The operations whose tensors are in `weights` (by role), in the order a layer applies them."""
    return [op for op in OPERATIONS.values() if op.roles[0] in weights]
