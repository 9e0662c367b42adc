"""`MaskedWeight`: a trainable tensor `W~ = W ⊙ m` that stores only its `k` trainable entries.

State:
- `values`: 1-D `nn.Parameter` of length `k` (the only trainable state: gradients and optimizer state are O(k));
- `index`: int32 buffer, the compact mask of `peft_apet.masks` (empty when unmasked). In a module state dict a
  discrete mask's index is Elias-Fano coded as uint8 (`peft_apet.index_codec`, about log2(n / k) + 2 bits per entry
  instead of 32); loading accepts that code and int32 positions. Adapter files pack every module's values and
  index into two tensors (`peft_apet.packing`), unpacked to this per-module form before loading.

`dense()` rebuilds the full tensor (zeros off the mask) for the small tensors of LoRA, adapters, biases and
prompts; masked deltas on large base weights never go through it (see `peft_apet.functional`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .index_codec import encode_indices, encoded_size, stored_positions
from .masks import aligned_pair_masks, build_mask, flat_indices
from .operations import OPERATION_OF_ROLE, PAIRS
from .plan import TensorPlan

# First matrices of two-matrix paths (see `peft_apet.masks.build_mask`).
_FIRST_OF_PAIR = tuple(first for first, _ in PAIRS)


def aligned_indices(tensors: dict[str, TensorPlan]) -> dict[str, torch.Tensor]:
    """Mask indices of the planned pairs whose masks are aligned, drawn together (by role); other tensors draw
    their own masks in `MaskedWeight`."""
    out = {}
    for first, second in PAIRS:
        a, b = tensors.get(first), tensors.get(second)
        if a is None or b is None or a.pairing != "aligned":
            continue
        out[first], out[second] = aligned_pair_masks(a.shape[0], a.shape[1], b.shape[0], a.num_entries,
                                                     b.num_entries, a.mask, a.seed)
    return out


class MaskedWeight(nn.Module):
    """A masked trainable tensor of logical shape `plan.shape` with `plan.num_entries` trainable entries.

    Args:
        plan: shape, role, mask kind and axis, entries and seed of the tensor (`peft_apet.plan.TensorPlan`).
        init_weights: start at the role's initialisation ("zeros" keeps the adapter an identity); False replaces
            "zeros" by a kaiming-uniform draw, so the adapter is not an identity (for tests, like PEFT's
            `init_lora_weights=False`).
        init_values: dense `plan.shape` values to start from (e.g. a prompt initialised from text); the trainable
            entries are read from it.
        index: the compact mask (`peft_apet.masks`) when drawn elsewhere (aligned pairs); else the one a strategy
            chose (`plan.index`), or one drawn here from `plan.seed`.
    """

    def __init__(self, plan: TensorPlan, init_weights: bool = True, init_values: torch.Tensor | None = None,
                 index: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(plan.shape)
        self.mask = plan.mask
        self.axis = plan.axis
        if index is None and plan.index is not None:
            index = plan.index.cpu()  # like a drawn mask: the layer moves it to its base layer's device
        if index is None:
            ordered = plan.role in _FIRST_OF_PAIR and plan.axis == 0
            index = build_mask(self.shape, plan.mask, plan.num_entries, plan.axis, plan.seed, ordered)
        self.register_buffer("index", index)
        values = self._initial_values(plan, init_weights, init_values)
        self.values = nn.Parameter(values)

    def _initial_values(self, plan: TensorPlan, init_weights: bool, init_values: torch.Tensor | None):
        k = plan.num_entries
        if init_values is not None:  # a dense tensor of `shape`, e.g. prompt embeddings of a text
            flat = flat_indices(self.shape, self.mask, self.index, k, self.axis)
            return init_values.reshape(-1)[flat].detach().clone().float()
        generator = torch.Generator().manual_seed(plan.seed + 1)
        scheme = OPERATION_OF_ROLE[plan.role].init[plan.role]
        if scheme == "zeros" and not init_weights:
            scheme = "kaiming_uniform"  # non-identity init for tests, like PEFT's init_lora_weights=False
        if scheme == "zeros":
            return torch.zeros(k)
        if scheme == "normal":
            return torch.randn(k, generator=generator)
        # kaiming_uniform_(a=sqrt(5)) of nn.Linear / PEFT LoRA A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = self.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(k, generator=generator) * 2 - 1) * bound

    @property
    def num_entries(self) -> int:
        return self.values.numel()

    def flat_indices(self) -> torch.Tensor:
        """int64 row-major positions of the stored values in the dense tensor."""
        return flat_indices(self.shape, self.mask, self.index, self.num_entries, self.axis)

    def dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor `W ⊙ m` (differentiable with respect to `values`); `values`: `(k,)` values to place
        instead of the stored ones (e.g. after dropout)."""
        values = self.values if values is None else values
        if self.mask is None:
            return values.view(self.shape)
        flat = values.new_zeros(math.prod(self.shape))
        return flat.index_add(0, self.flat_indices(), values).view(self.shape)

    def dense_mask(self) -> torch.Tensor:
        """The boolean mask `m` (for inspection)."""
        out = torch.zeros(math.prod(self.shape), dtype=torch.bool, device=self.index.device)
        out[self.flat_indices()] = True
        return out.view(self.shape)

    @torch.no_grad()
    def add_to_(self, target: torch.Tensor, alpha: float = 1.0) -> None:
        """`target += alpha * (W ⊙ m)` in place; `target` is any (possibly strided) view of logical shape."""
        if tuple(target.shape) != self.shape:
            raise ValueError(f"cannot add a masked tensor of shape {self.shape} to one of shape {tuple(target.shape)}")
        flat = self.flat_indices().to(target.device)
        values = (alpha * self.values).to(target.dtype).to(target.device)
        rows, cols = (flat // self.shape[-1], flat % self.shape[-1]) if len(self.shape) == 2 else (None, flat)
        if rows is None:
            target.index_put_((cols,), values, accumulate=True)
        else:
            target.index_put_((rows, cols), values, accumulate=True)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """As `nn.Module`'s, with a discrete mask's `index` as its uint8 code `(encoded_size(k, n),)`, on the
        buffer's device (a meta buffer gives a meta code of the right size: shapes of meta models stay readable)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mask == "discrete":
            k, n = self.num_entries, math.prod(self.shape)
            if self.index.is_meta:
                code = torch.empty(encoded_size(k, n), dtype=torch.uint8, device="meta")
            else:
                code = encode_indices(self.index, n).to(self.index.device)
            destination[prefix + "index"] = code

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """As `nn.Module`'s; a discrete mask's `index` may be its uint8 code or int32 positions (peft-apet 0.1).

        The code is decoded (ValueError if damaged) before the default loading checks shapes and copies."""
        key = prefix + "index"
        stored = state_dict.get(key)
        if self.mask == "discrete" and isinstance(stored, torch.Tensor):
            k = self.num_entries
            if stored.is_meta and stored.dtype == torch.uint8:  # a code without data: only its shape is known
                positions = torch.empty(k, dtype=self.index.dtype, device="meta")
            else:  # same device as given: `load_state_dict(assign=True)` keeps the tensor itself
                positions = stored_positions(stored, k, math.prod(self.shape)).to(stored.device)
            # torch hands each module a copy of the caller's dict: replacing the entry changes nothing of theirs
            state_dict[key] = positions
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, mask={self.mask}, axis={self.axis}, trainable={self.num_entries}"
