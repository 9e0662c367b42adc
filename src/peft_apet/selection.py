"""Choosing which entries a mask trains: by magnitude, gradient, Fisher information or SAM.

A part's `mask_strategy` (see `APETPart`) ranks the entries of its tensors by a score and trains the top ones,
keeping the exact budget of `peft_apet.budget`:

| strategy    | score of entry i                                         | needs data | chosen                       |
|-------------|----------------------------------------------------------|------------|------------------------------|
| `random`    | none: a seeded uniform draw (`peft_apet.masks`)           | no         | when the adapter is created  |
| `magnitude` | `|W_i|` of the pre-trained weight (or bias)               | no         | when the adapter is created  |
| `gradient`  | `|g_i|`, `g` = mean per-example gradient of the loss      | yes        | by `calibrate_masks`         |
| `fisher`    | `F_i` = mean of squared per-example gradients             | yes        | by `calibrate_masks`         |
| `sam`       | `g_i^2 / (F_i + λ)`                                       | yes        | by `calibrate_masks`         |
| registered  | `score_fn(base_layer, role, shape, **kwargs)`             | optional   | see `register_mask_strategy` |

Where strategies apply: `delta` parts (a masked change of a pre-trained weight) and `bias` parts. Both start at
zero on top of the pre-trained model, so a score taken at the pre-trained model (adapters disabled) says what
training that one entry would do. LoRA, adapter and prompt tensors are new: their entries have no pre-trained value
(a random init's magnitude means nothing) and, while the zero-initialised second matrix blocks it, no gradient
either; the config refuses non-random strategies there. Magnitude on a `bias` part needs modules that own a bias.

Data-driven strategies (`gradient`, `fisher`, `sam`) are scored by `peft_apet.calibration`, whose docstring
states the per-example gradients, the Fisher estimate and SAM's Hessian approximation.

Budgets. `selection_scope="module"` (default) keeps every module's planned number of entries and ranks entries
within each module (lines, by their summed scores, for adjacent masks: the `ceil(k / L)` best lines, of which the
highest-numbered holds the `k mod L` remainder as its first entries, the adjacent format's one partial line).
`"global"` ranks all entries of a part across its modules (the paper's setting): the part keeps its exact total, and
the per-module counts the scores earn are recorded in `part.mask_counts`, so that `PeftModel.from_pretrained`
rebuilds those shapes (the masks themselves are in the checkpoint) without recalibrating. Ties are broken by
position: module order, then flat index. The global k-th largest score is found by bisection on float32 bit patterns
(at most 32 counting passes), so scores are never concatenated or sorted. Memory: scores of a part are one float32
tensor per targeted tensor; calibration holds at most two per targeted tensor (`sam`: the summed gradient, what
`.grad` would hold in full fine-tuning, and one running sum of squares) and the inputs of the targeted modules for
one batch.

Lifecycle. Data-free strategies choose their masks while the adapter is planned (`peft_apet.plan.plan_adapter`,
from the base weights, before any module is replaced: an error leaves the model as it was); the plan carries the
chosen masks, and the layers are built once with them. Data-driven parts start with random placeholder masks (with
a warning) until `calibrate_masks(model, batches)` plans the adapter again, chooses their masks and swaps them in
(`APETLayer.replace_mask`). Choosing masks resets the part's values to their initial values; the tuner then
records the per-module counts in `part.mask_counts` (`peft_apet.plan.record_mask_counts`).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import APETPart
from .masks import INDEX_DTYPE, as_2d, line_length
from .modules import base_layer_of
from .strategies import data_free_score_fn

if TYPE_CHECKING:  # annotations only: planning imports this module
    from .plan import AdapterPlan, TensorPlan


# ---------------------------------------------------------------------------------------------- top-k
def _float_key(value: float) -> int:
    """A signed int whose order is the order of float32 values (the bit pattern, negatives mirrored)."""
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def _key_float(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def select_top_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted int64 flat indices of the `k` largest entries over all `scores` (float32), one tensor per input.

    Ties at the threshold go to the earlier tensor, then the lower flat index. The k-th largest value is found by
    bisection over float32 bit patterns: at most 32 passes that count entries above a value, so the inputs are never
    concatenated or sorted and the extra memory is one boolean mask of one tensor at a time plus the chosen indices.
    """
    scores = [s.reshape(-1) for s in scores]
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"cannot choose {k} entries out of {total}.")
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=s.device) for s in scores]
    nonempty = [s for s in scores if s.numel()]
    low = _float_key(min(float(s.min()) for s in nonempty))
    high = _float_key(max(float(s.max()) for s in nonempty))
    while low < high:  # invariant: at least k entries >= value(low), fewer than k entries >= value(high + 1)
        middle = (low + high + 1) // 2
        value = _key_float(middle)
        if sum(int((s >= value).sum()) for s in nonempty) >= k:
            low = middle
        else:
            high = middle - 1
    threshold = _key_float(low)
    above = [(s > threshold).nonzero().flatten() for s in scores]
    missing = k - sum(a.numel() for a in above)
    chosen = []
    for s, a in zip(scores, above):
        tied = (s == threshold).nonzero().flatten()[:missing] if missing else a[:0]
        missing -= tied.numel()
        chosen.append(torch.cat([a, tied]).sort().values)
    return chosen


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class ScoredTensor:
    """One masked tensor a strategy ranks: its module (by name in the base model), base layer and plan."""

    name: str
    base_layer: nn.Module
    tensor: TensorPlan


def targets_of_part(plan: AdapterPlan, model: nn.Module, part: APETPart) -> list[ScoredTensor]:
    """The tensors of `part` in `plan`, in model order."""
    role = part.operation  # scored parts (delta, bias) own one tensor per module, named like the operation
    return [ScoredTensor(name, base_layer_of(model, name), m.tensors[role]) for name, m in plan.modules.items()
            if role in m.tensors]


def checked_scores(scores: torch.Tensor, target: ScoredTensor, strategy: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(target.tensor.shape):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"mask_strategy {strategy!r} returned scores of shape {got} for {target.name} "
                         f"({target.tensor.role}); expected {tuple(target.tensor.shape)}.")
    scores = scores.detach().float()
    if not torch.isfinite(scores).all():
        raise ValueError(f"mask_strategy {strategy!r} gave non-finite scores for {target.name} "
                         f"({target.tensor.role}); check the model's weights and the calibration loss.")
    return scores


def data_free_scores(part: APETPart, targets: list[ScoredTensor]) -> list[torch.Tensor]:
    score_fn = data_free_score_fn(part.mask_strategy)
    out = []
    for t in targets:
        try:
            scores = score_fn(t.base_layer, t.tensor.role, tuple(t.tensor.shape), **(part.mask_strategy_kwargs or {}))
        except ValueError as e:
            raise ValueError(f"part '{part.operation}', module {t.name}: {e}") from e
        out.append(checked_scores(scores, t, part.mask_strategy))
    return out


def _chosen(target: ScoredTensor, index: torch.Tensor, num_entries: int) -> ScoredTensor:
    if index.numel() and int(index.max()) >= 2**31:  # as `peft_apet.masks.discrete_mask` refuses such tensors
        raise ValueError(f"{target.name}: tensor with {math.prod(target.tensor.shape)} entries is too large for int32 "
                         "indices")
    return ScoredTensor(target.name, target.base_layer,
                        replace(target.tensor, index=index.to(INDEX_DTYPE), num_entries=num_entries))


def choose_masks(targets: list[ScoredTensor], scores: list[torch.Tensor], scope: str) -> list[ScoredTensor]:
    """The targets with their chosen masks (`TensorPlan.index`, and `num_entries`): top entries per module (its
    planned count) or over the part (`scope="global"`, where each module gets the entries its scores earn)."""
    if scope == "global":
        total = sum(t.tensor.num_entries for t in targets)
        picks = select_top_k(scores, total)
        return [_chosen(t, p, p.numel()) for t, p in zip(targets, picks)]
    out = []
    for t, s in zip(targets, scores):
        plan = t.tensor
        if plan.mask == "adjacent":  # whole lines, ranked by their summed scores
            rows, cols = as_2d(plan.shape)
            lines = s.reshape(rows, cols).sum(1 if plan.axis == 0 else 0)
            (index,) = select_top_k([lines], math.ceil(plan.num_entries / line_length(plan.shape, plan.axis)))
        else:
            (index,) = select_top_k([s], plan.num_entries)
        out.append(_chosen(t, index, plan.num_entries))
    return out
