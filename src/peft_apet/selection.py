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
within each module (lines, by their summed scores, for adjacent masks). `"global"` ranks all entries of a part
across its modules (the paper's setting): the part keeps its exact total, and the per-module counts the scores
earn are recorded in `part.mask_counts`, so that `PeftModel.from_pretrained` rebuilds those shapes (the masks
themselves are in the checkpoint) without recalibrating. Ties are broken by position: module order, then flat
index. The global k-th largest score is found by bisection on float32 bit patterns (at most 32 counting passes),
so scores are never concatenated or sorted. Memory: scores of a part are one float32 tensor per targeted tensor;
calibration holds at most two per targeted tensor (`sam`: the summed gradient, what `.grad` would hold in full
fine-tuning, and one running sum of squares) and the inputs of the targeted modules for one batch.

Lifecycle. `get_peft_model` chooses the masks of data-free strategies from the base weights before any module is
replaced (so an error leaves the model as it was); data-driven parts start with random placeholder masks (with a
warning) until `calibrate_masks(model, batches)` replaces them. Choosing masks resets the part's values to their
initial values and writes `part.mask_counts`.
"""
from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import APETConfig, APETPart
from .masks import INDEX_DTYPE, as_2d, line_length
from .modules import base_layer_of
from .plan import AdapterPlan, TensorPlan, plan_adapter
from .strategies import data_free_score_fn, is_data_driven


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


@dataclass
class MaskChoice:
    target: ScoredTensor
    index: torch.Tensor  # the compact mask of `peft_apet.masks` (flat indices or line ids)
    num_entries: int


def targets_of_part(plan: AdapterPlan, model: nn.Module, part: APETPart) -> list[ScoredTensor]:
    role = part.operation  # delta and bias parts own one tensor per module, named like the operation
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


def choose_masks(targets: list[ScoredTensor], scores: list[torch.Tensor], scope: str) -> list[MaskChoice]:
    """The masks of a part: top entries per module (its planned count) or over the part (`scope="global"`)."""
    if scope == "global":
        total = sum(t.tensor.num_entries for t in targets)
        picks = select_top_k(scores, total)
        return [MaskChoice(t, p.to(INDEX_DTYPE), p.numel()) for t, p in zip(targets, picks)]
    out = []
    for t, s in zip(targets, scores):
        plan = t.tensor
        if plan.mask == "adjacent":  # whole lines, ranked by their summed scores
            rows, cols = as_2d(plan.shape)
            lines = s.reshape(rows, cols).sum(1 if plan.axis == 0 else 0)
            (index,) = select_top_k([lines], math.ceil(plan.num_entries / line_length(plan.shape, plan.axis)))
        else:
            (index,) = select_top_k([s], plan.num_entries)
        out.append(MaskChoice(t, index.to(INDEX_DTYPE), plan.num_entries))
    return out


def record_counts(part: APETPart, choices: list[MaskChoice]) -> None:
    part.mask_counts = {c.target.name: c.num_entries for c in choices}


def select_data_free_masks(model: nn.Module, config: APETConfig) -> list[MaskChoice]:
    """Choose the masks of parts with a data-free strategy (`magnitude`, registered ones) from `model`'s weights,
    before the adapter is injected, and record their per-module counts in the parts (so the plan builds those
    shapes). Returns the choices for `APETModel.install_masks` once the layers exist. Called by
    `APETModel.inject_adapter`.

    Parts whose counts are recorded already (a saved adapter being loaded) keep them: each module gets its recorded
    number of entries, ranked within the module, and the checkpoint then supplies the masks.
    """
    scored = [p for p in config.parts if p.mask_strategy != "random"]
    if not scored:
        return []
    plan = plan_adapter(model, config)
    choices = []
    for part in scored:
        if is_data_driven(part.mask_strategy):
            if part.mask_counts is None:
                warnings.warn(f"APET part '{part.operation}' uses mask_strategy={part.mask_strategy!r}: its masks are "
                              "random placeholders until `peft_apet.calibrate_masks(model, batches)` chooses them.",
                              stacklevel=4)
            continue
        if data_free_score_fn(part.mask_strategy) is None:
            continue  # a registered strategy of a saved adapter, not registered here: the checkpoint has its masks
        targets = targets_of_part(plan, model, part)
        scope = "module" if part.mask_counts is not None else config.selection_scope
        part_choices = choose_masks(targets, data_free_scores(part, targets), scope)
        record_counts(part, part_choices)
        choices += part_choices
    return choices
