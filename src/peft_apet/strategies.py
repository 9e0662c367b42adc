"""The registry of mask strategies: which names `mask_strategy` accepts, which of them need calibration data,
the settings each takes, and the score functions of data-free ones (`magnitude` and user-registered strategies).

How the scores become masks is `peft_apet.selection`; how data-driven statistics are gathered is
`peft_apet.calibration`. This module imports no layer or kernel, so a config can check its strategy cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .modules import base_tensor

# Built-in strategies; users add their own with `register_mask_strategy`.
MASK_STRATEGIES = ("random", "magnitude", "gradient", "fisher", "sam")
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

    Args:
        name: the name to use as `mask_strategy`; not a built-in one.
        score_fn: the score function described above.
        uses_gradients: whether it needs calibration statistics (then `calibrate_masks` runs it).
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
