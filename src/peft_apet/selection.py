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
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MASK_STRATEGIES, APETConfig, APETPart
from .layer import APETLayer
from .masked_weight import MaskedWeight
from .masks import INDEX_DTYPE, as_2d, line_length
from .plan import AdapterPlan, TensorPlan, is_conv1d, plan_adapter
from .quantized import dequantized_weight, is_bnb_quantized

DATA_DRIVEN = ("gradient", "fisher", "sam")
# Settings each built-in strategy accepts in `mask_strategy_kwargs`, with their checks.
_BUILTIN_KWARGS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "magnitude": {},
    "gradient": {},
    "fisher": {},
    "sam": {"damping": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf},
}

ScoreFn = Callable[..., torch.Tensor]
_REGISTRY: dict[str, tuple[ScoreFn, bool]] = {}  # name -> (score_fn, uses_gradients)


# ---------------------------------------------------------------------------------------------- strategies
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


def magnitude_scores(base_layer: nn.Module, role: str, shape: tuple[int, ...]) -> torch.Tensor:
    """`|W|` of the pre-trained weight or bias (the built-in `magnitude` strategy)."""
    tensor = base_tensor(base_layer, role)
    if tensor is None:
        raise ValueError(f"mask_strategy='magnitude' ranks entries by |b| of the pre-trained bias, but this "
                         f"{type(base_layer).__name__} has no bias (a new bias has no magnitude); use 'random' or a "
                         "data-driven strategy ('gradient', 'fisher', 'sam').")
    return tensor.detach().abs()


def register_mask_strategy(name: str, score_fn: ScoreFn, *, uses_gradients: bool = False) -> None:
    """Make `score_fn` available as `mask_strategy=name` on `delta` and `bias` parts.

    Signature: `score_fn(base_layer, role, shape, **mask_strategy_kwargs) -> torch.Tensor` with the base module
    (`nn.Linear`, Conv1D, `nn.LayerNorm`, ...), `role` "delta" or "bias", and the logical `shape` of the masked
    tensor (`(out, in)` for a delta, `(features,)` for a bias; `base_tensor(base_layer, role)` gives the pre-trained
    tensor in that layout). It returns finite float scores of `shape`: the highest train, ties go to the lower
    position.

    With `uses_gradients=False` the strategy is data-free, like `magnitude`: it runs when the adapter is created.
    With `uses_gradients=True` it runs in `calibrate_masks`, like `sam`, and also receives the calibration
    statistics of the tensor as keyword arguments, both float32 of `shape`: `gradient` (the mean per-example
    gradient `g` of the loss) and `fisher` (the mean squared per-example gradient `F`); see
    `peft_apet.calibration`. E.g. `lambda base_layer, role, shape, gradient, fisher: gradient.abs() *
    base_tensor(base_layer, role).abs()` ranks by the first-order change `|g ⊙ W|`.

    The name, not the function, goes into `adapter_config.json`: register before creating the config; loading a
    saved adapter does not need it (its masks are in the checkpoint). Registering a name again replaces its function;
    built-in names cannot be taken.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a mask strategy name must be a non-empty str, got {name!r}.")
    if name in MASK_STRATEGIES:
        raise ValueError(f"{name!r} is a built-in mask strategy ({list(MASK_STRATEGIES)}); choose another name.")
    if not callable(score_fn):
        raise ValueError(f"`score_fn` must be callable, got {score_fn!r}.")
    if not isinstance(uses_gradients, bool):
        raise ValueError(f"`uses_gradients` must be a bool, got {uses_gradients!r}.")
    _REGISTRY[name] = (score_fn, uses_gradients)


def registered_mask_strategies() -> list[str]:
    """Names usable as `mask_strategy`: the built-in ones, then the registered ones."""
    return [*MASK_STRATEGIES, *sorted(_REGISTRY)]


def check_mask_strategy(name: str, kwargs: dict[str, Any], owner: str = "APETPart") -> None:
    """Raise ValueError if `name` is no known strategy or `kwargs` are not settings it takes (built-ins only)."""
    if name in _BUILTIN_KWARGS:
        allowed = _BUILTIN_KWARGS[name]
        for key, value in kwargs.items():
            if key not in allowed:
                raise ValueError(f"{owner}: mask_strategy={name!r} takes settings {sorted(allowed)} in "
                                 f"`mask_strategy_kwargs`, got {key!r}.")
            if not allowed[key](value):
                raise ValueError(f"{owner}: `mask_strategy_kwargs[{key!r}]` of {name!r} must be a non-negative "
                                 f"finite number, got {value!r}.")
    elif name not in _REGISTRY:
        raise ValueError(f"{owner}: unknown mask_strategy {name!r}; known: {registered_mask_strategies()}. Register "
                         "your own with peft_apet.register_mask_strategy(name, score_fn) before creating the config.")


def is_data_driven(name: str) -> bool:
    """Whether strategy `name` chooses its masks from calibration data (built-in or registered with gradients)."""
    return name in DATA_DRIVEN or name in _REGISTRY and _REGISTRY[name][1]


def registered_score_fn(name: str) -> ScoreFn | None:
    """The function registered as `name` (data-free or not), or None."""
    return _REGISTRY[name][0] if name in _REGISTRY else None


def data_free_score_fn(name: str) -> ScoreFn | None:
    """The score function of a data-free strategy (`magnitude` or registered without gradients), or None."""
    if name == "magnitude":
        return magnitude_scores
    return None if is_data_driven(name) else registered_score_fn(name)


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


def base_layer_of(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


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


def install_masks(model: nn.Module, adapter_name: str, config: APETConfig, choices: list[MaskChoice]) -> None:
    """Replace the masked tensors of `adapter_name` by ones with the chosen masks and initial values (same device,
    dtype and trainability as before)."""
    for choice in choices:
        layer = model.get_submodule(choice.target.name)
        if not isinstance(layer, APETLayer):
            raise ValueError(f"{choice.target.name} is not an APET layer; was the adapter injected?")
        role = choice.target.tensor.role
        old = layer.apet_weights[adapter_name][role]
        new = MaskedWeight(replace(choice.target.tensor, num_entries=choice.num_entries), config.init_weights)
        new.index = choice.index.cpu()
        new = new.to(device=old.values.device, dtype=old.values.dtype)
        new.values.requires_grad_(old.values.requires_grad)
        layer.apet_weights[adapter_name][role] = new


def select_data_free_masks(model: nn.Module, config: APETConfig) -> list[MaskChoice]:
    """Choose the masks of parts with a data-free strategy (`magnitude`, registered ones) from `model`'s weights,
    before the adapter is injected, and record their per-module counts in the parts (so the plan builds those
    shapes). Returns the choices for `install_masks` once the layers exist. Called by `APETModel.inject_adapter`.

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
