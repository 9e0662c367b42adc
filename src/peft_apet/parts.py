"""The parts of an APET adapter: one config class per operation (see `peft_apet.config` for the operations).

Each operation has a part class holding only its own settings: `PromptPart`, `LoraPart`, `AdapterPart`,
`BiasPart`, `DeltaPart`, on `BasePart` (targets, mask, budget), with `PairedPart` (how the masks of lora's and
adapter's two matrices pair) and `ScoredPart` (the mask strategy of bias and delta). `APETPart(operation=..., ...)`
builds the class of its operation, and `adapter_config.json` keeps peft-apet 0.1's format: every part lists the
fields of every operation (`SAVED_FIELDS`), null where it does not have them. Fields added after 0.1
(`SAVED_IF_SET`) are written after those, and only when a part sets them to something other than their default, so
that a config that does not use them writes the same bytes as before.
"""

from __future__ import annotations

import abc
import functools
import inspect
import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .operations import MERGEABLE_OPERATIONS, SCORED_OPERATIONS
from .strategies import check_mask_strategy

OPERATIONS = ("prompt", "lora", "adapter", "bias", "delta")
MASKS = ("adjacent", "discrete")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity")
PROMPT_INITS = ("random", "text")
# How the masks of a two-matrix part (lora A/B, adapter down/up) relate; see `peft_apet.masks.aligned_pair_masks`.
MASK_PAIRINGS = ("aligned", "independent")


class UnknownFieldError(TypeError, ValueError):
    """An unknown keyword given to `APETPart` / `APETConfig` (or found in an `adapter_config.json`).

    A `TypeError` like any Python call with an unexpected keyword (PEFT's configs and PEFT's tests rely on that),
    and a `ValueError` like every other invalid setting of peft-apet. Its message never contains "got an unexpected
    keyword argument", so PEFT's loader does not take it for a field it may drop: an adapter saved by a newer
    peft-apet is refused, not loaded with some settings silently ignored.
    """


def check_choice(name: str, value: Any, allowed: tuple, allow_none: bool = False) -> None:
    """Raise a ValueError naming `name` and the `allowed` values unless `value` is one of them (same type too)."""
    if value is None and allow_none:
        return
    # `True in (0, 1)` and `1.0 in (0, 1)` hold in Python: compare types as well as values.
    if not any(type(value) is type(a) and value == a for a in allowed):
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be one of {list(allowed)}{extra}, got {value!r}.")


def check_budget(owner: str, num_trainable_params: Any, density: Any) -> None:
    """Raise a ValueError unless the budget is at most one of an int count >= 1 and a density in (0, 1]."""
    if num_trainable_params is not None and density is not None:
        raise ValueError(f"{owner}: give `num_trainable_params` or `density`, not both.")
    if num_trainable_params is not None:
        if isinstance(num_trainable_params, bool) or not isinstance(num_trainable_params, int):
            raise ValueError(
                f"{owner}: `num_trainable_params` must be a positive int, got {num_trainable_params!r}."
            )
        if num_trainable_params < 1:
            raise ValueError(f"{owner}: `num_trainable_params` must be >= 1, got {num_trainable_params}.")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"{owner}: `density` must be a float in (0, 1], got {density!r}.")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_optional_str(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` unless `value` is a str or None."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a str or None, got {value!r}.")


def _check_json_dict(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict with str keys, got {value!r}.")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must hold JSON values (it is saved in adapter_config.json): {e}") from e

def _check_target_modules(name: str, value: Any) -> None:
    if value is None or isinstance(value, str) and value:
        return
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ValueError(
        f"`{name}` must be None (the model type's default), a non-empty regex string or a non-empty list of "
        f"module-name suffixes, got {value!r}."
    )


def args_block(entries: list[tuple[str, str]]) -> str:
    """A Google-style `Args:` block: one wrapped entry per (name, description)."""
    lines = ["Args:"]
    for name, text in entries:
        lines += textwrap.wrap(f"{name}: {text}", width=112, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


def with_args(cls: type, extra: tuple[tuple[str, str], ...] = (), skip: tuple[str, ...] = ()) -> type:
    """`cls` with an `Args:` block from its fields' help appended to its docstring (the help is written once)."""
    entries = [*extra, *((f.name, f.metadata["help"]) for f in fields(cls) if f.name not in skip)]
    cls.__doc__ = f"{inspect.cleandoc(cls.__doc__)}\n\n{args_block(entries)}"
    return cls


_OPERATION_HELP = f"The part's operation, one of {list(OPERATIONS)}; each part class has its own."


def _tag(operation: str) -> Any:
    """The `operation` field of a part class: fixed to `operation`, kept as a field so that it is saved."""
    return field(default=operation, metadata={"help": _OPERATION_HELP})


def _check_strategy_name(owner: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{owner}: `mask_strategy` must be a non-empty str, got {value!r}.")


@with_args
@dataclass
class BasePart:
    """What every part has: where it acts and how much of it trains. Build parts with `APETPart(operation=...)` or
    a part class (`LoraPart(r=4, ...)`); this base is not a part of its own."""

    # Field order = the presets' parameter order (after the operation's own settings), which 0.1 fixed.
    operation: str | None = field(default=None, metadata={"help": _OPERATION_HELP})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules this part acts on: a list of name suffixes, a regex (full match) or 'all-linear'. "
            "None uses the default for the model type (see `peft_apet.targets`). Ignored by `prompt`, which "
            "always acts on the input embedding."
        },
    )
    mask: str | None = field(
        default=None,
        metadata={"help": "None trains whole tensors; 'adjacent' trains whole lines; 'discrete' scattered entries."},
    )
    mask_axis: int = field(
        default=0,
        metadata={
            "help": "For 'adjacent' masks: 0 trains rows (output features of a weight, tokens of a prompt), "
            "1 trains columns (input features, embedding dimensions)."
        },
    )
    num_trainable_params: int | None = field(
        default=None, metadata={"help": "Exact number of trainable entries of this part (needs a mask)."}
    )
    density: float | None = field(
        default=None, metadata={"help": "Fraction in (0, 1] of this part's entries to train (needs a mask)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to leave out, same syntax as `target_modules`."}
    )
    mask_counts: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Written by mask selection, leave None: the trainable entries of each module (by module name) "
            "as a strategy chose them. With selection_scope='global' they differ from the planned split; a saved "
            "adapter reloads with these shapes (its masks come from the checkpoint) without recalibrating."
        },
    )

    @property
    def mask_strategy(self) -> str:
        """'random': only `ScoredPart`s (bias, delta) rank their entries; every other part draws them at random."""
        return "random"

    @property
    def mergeable(self) -> bool:
        """Whether this part can be folded into the base weights (`lora`, `bias`, `delta`)."""
        return self.operation in MERGEABLE_OPERATIONS

    @property
    def _owner(self) -> str:
        return f"part '{self.operation}'"

    def __post_init__(self) -> None:
        if type(self).operation is None:
            raise TypeError(f"{type(self).__name__} is a base class: build a part with APETPart(operation=...) or "
                            f"one of {[c.__name__ for c in PART_CLASSES.values()]}.")
        check_choice("operation", self.operation, (type(self).operation,))
        owner = self._owner
        self._check_mask(owner)
        check_budget(owner, self.num_trainable_params, self.density)
        if (self.num_trainable_params is not None or self.density is not None) and self.mask is None:
            raise ValueError(f"{owner}: a budget needs `mask` set to one of {list(MASKS)}.")
        _check_target_modules("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_target_modules("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.mask_counts is not None:
            if self.mask_strategy == "random":
                raise ValueError(f"{owner}: `mask_counts` belong to a non-random `mask_strategy`; leave them None "
                                 "for 'random'.")
            if not isinstance(self.mask_counts, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in self.mask_counts.items()):
                raise ValueError(f"{owner}: `mask_counts` must map module names to non-negative ints, got "
                                 f"{self.mask_counts!r}.")
            self.mask_counts = dict(self.mask_counts)

    def _check_mask(self, owner: str) -> None:
        """Checks of `mask` and `mask_axis` (before the budget, which needs a valid mask)."""
        check_choice("mask", self.mask, MASKS, allow_none=True)
        check_choice("mask_axis", self.mask_axis, (0, 1))

    @classmethod
    def _misplaced(cls, operation: str, name: str, value: Any) -> ValueError:
        """The error for field `name`, declared by this class, given as `value` to a part of `operation`."""
        users = [op for op, part_class in PART_CLASSES.items() if issubclass(part_class, cls)]
        where = f"operation {users[0]!r}" if len(users) == 1 else f"operations {users}"
        return ValueError(f"part '{operation}': `{name}` is only used by {where} (got {name}={value!r}); leave it "
                          f"None for '{operation}'.")

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict:
        """Refuse unknown fields with an `UnknownFieldError` (TypeError and ValueError) listing the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise UnknownFieldError(f"{cls.__name__} has no fields {unknown}; allowed: {allowed}.")
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """The part as `adapter_config.json` stores it: every field of every operation, in peft-apet 0.1's order;
        a field this part does not have holds what 0.1 wrote for it (None; "aligned" / "random" for
        `mask_pairing` / `mask_strategy`). Then the fields of `SAVED_IF_SET` this part sets to a non-default value."""
        own = asdict(self)
        saved = {name: own[name] if name in own else _ABSENT.get(name, (None,))[0] for name in SAVED_FIELDS}
        saved.update((name, own[name]) for name, default in SAVED_IF_SET.items() if own.get(name, default) != default)
        return saved


@with_args
@dataclass
class PairedPart(BasePart):
    """A part of two matrices whose masks may share rank units (lora A/B, adapter down/up)."""

    mask_pairing: str = field(
        default="aligned",
        metadata={
            "help": "lora and adapter parts with a mask: 'aligned' draws the two matrices' masks on shared rank "
            "(bottleneck) units, so every trainable entry can receive a gradient (adjacent masks then take whole "
            "units: rows of A / down, columns of B / up, and `mask_axis` must stay 0); 'independent' draws each "
            "matrix's mask on its own, as in the APET paper (some entries may never learn). Parts read from an "
            "adapter_config.json without this field (peft-apet 0.1) are 'independent'."
        },
    )

    def _check_mask(self, owner: str) -> None:
        super()._check_mask(owner)
        check_choice("mask_pairing", self.mask_pairing, MASK_PAIRINGS)
        if self.mask == "adjacent" and self.mask_pairing == "aligned" and self.mask_axis != 0:
            raise ValueError(
                f"{owner}: mask_axis={self.mask_axis} with mask_pairing='aligned': aligned adjacent masks train whole "
                "rank units (rows of the first matrix, columns of the second), so `mask_axis` must be 0; set "
                "mask_pairing='independent' to mask columns of both matrices."
            )


@with_args
@dataclass
class ScoredPart(BasePart):
    """A part whose entries a mask strategy can rank: an additive change that starts at zero on top of a
    pre-trained tensor, so that a score taken at the pre-trained model says what training an entry would do.
    Its entries may also be dropped out in training (`delta_dropout`)."""

    mask_strategy: str = field(
        default="random",
        metadata={
            "help": "Which entries a mask trains: 'random' (seeded), 'magnitude' (largest |W| of the base weight or "
            "bias, chosen when the adapter is created), 'gradient', 'fisher' or 'sam' (chosen from calibration "
            "data by `peft_apet.calibrate_masks`), or a name registered with `peft_apet.register_mask_strategy`. "
            f"Strategies other than 'random' need a mask and a part in {list(SCORED_OPERATIONS)}."
        },
    )
    mask_strategy_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Settings of the mask strategy (JSON values), e.g. {'damping': 0.1} for 'sam'."},
    )
    delta_dropout: float = field(
        default=0.0,
        metadata={
            "help": "In training, each trainable entry of the delta (or bias delta) is dropped with this probability "
            "in [0, 1) and the kept ones are scaled by 1 / (1 - p), a fresh draw in every forward pass, as SpaRTA "
            "does; no effect in eval, merge or export. Saved in adapter_config.json only when not 0."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = self._owner
        if (isinstance(self.delta_dropout, bool) or not isinstance(self.delta_dropout, (int, float))
                or not 0.0 <= self.delta_dropout < 1.0):
            raise ValueError(f"{owner}: `delta_dropout` must be a float in [0, 1), got {self.delta_dropout!r}.")
        self.delta_dropout = float(self.delta_dropout)
        _check_strategy_name(owner, self.mask_strategy)
        if self.mask_strategy_kwargs is not None:
            _check_json_dict(f"{owner}: `mask_strategy_kwargs`", self.mask_strategy_kwargs)
            self.mask_strategy_kwargs = dict(self.mask_strategy_kwargs)
        if self.mask_strategy == "random":
            if self.mask_strategy_kwargs:
                raise ValueError(f"{owner}: `mask_strategy_kwargs` belong to a non-random `mask_strategy`; leave "
                                 "them None for 'random'.")
            return
        if self.mask is None:
            raise ValueError(f"{owner}: mask_strategy={self.mask_strategy!r} chooses entries of a mask; set `mask` "
                             "('discrete') and a budget.")
        if self.mask_counts is None:  # else the masks were chosen already and live in the checkpoint
            check_mask_strategy(self.mask_strategy, self.mask_strategy_kwargs or {}, owner)

    @classmethod
    def _misplaced(cls, operation: str, name: str, value: Any) -> ValueError:
        if name == "delta_dropout":
            return super()._misplaced(operation, name, value)
        if name == "mask_strategy":
            _check_strategy_name(f"part '{operation}'", value)
        return ValueError(
            f"part '{operation}': {name}={value!r} is a setting of {list(SCORED_OPERATIONS)} parts, which rank "
            "entries of tensors that start at zero on top of pre-trained weights. A "
            f"'{operation}' tensor is new: its entries have no pre-trained value or gradient to rank them by (LoRA A "
            "/ adapter down get no gradient while the zero-initialised second matrix blocks it). Leave "
            f"`{name}` None for '{operation}' (mask_strategy='random')."
        )


@with_args
@dataclass
class PromptPart(BasePart):
    """Prompt tuning: `num_virtual_tokens` soft tokens prepended to the input, a table of shape
    `(num_virtual_tokens, embedding_dim)`. Always acts on the input embedding (`target_modules` stays None)."""

    operation: str = _tag("prompt")
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "Number of soft tokens prepended to the input."}
    )
    prompt_init: str = field(
        default="random",
        metadata={"help": "'random' (N(0, 1), as PEFT) or 'text' (embeddings of `prompt_init_text`)."},
    )
    prompt_init_text: str | None = field(
        default=None, metadata={"help": "Text whose token embeddings initialise the prompt."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer used to encode `prompt_init_text`."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError("part 'prompt': `target_modules` must be None; prompts act on the input embedding.")
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        check_choice("prompt_init", self.prompt_init, PROMPT_INITS)
        check_optional_str("prompt_init_text", self.prompt_init_text)
        check_optional_str("tokenizer_name_or_path", self.tokenizer_name_or_path)
        if self.prompt_init == "text" and not (self.prompt_init_text and self.tokenizer_name_or_path):
            raise ValueError("part 'prompt': prompt_init='text' needs `prompt_init_text` and `tokenizer_name_or_path`.")


@with_args
@dataclass
class LoraPart(PairedPart):
    """LoRA: `h + (lora_alpha / r) · dropout(h) A^T B^T` with A `(r, in)`, B `(out, r)`."""

    operation: str = _tag("lora")
    r: int = field(default=8, metadata={"help": "Rank of the low-rank path."})
    lora_alpha: float = field(default=8.0, metadata={"help": "The path is scaled by lora_alpha / r, as in PEFT."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the low-rank path."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha)):
            raise ValueError(f"`lora_alpha` must be a finite number, got {self.lora_alpha!r}.")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"`lora_dropout` must be a float in [0, 1), got {self.lora_dropout!r}.")


@with_args
@dataclass
class AdapterPart(PairedPart):
    """Houlsby adapter: `y + σ(y W_down^T) W_up^T` after each targeted module's output `y`, with W_down
    `(bottleneck, d)` and W_up `(d, bottleneck)`."""

    operation: str = _tag("adapter")
    bottleneck: int = field(default=24, metadata={"help": "Bottleneck width of the plug-in."})
    activation: str = field(default="relu", metadata={"help": f"The non-linearity σ, one of {list(ACTIVATIONS)}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("bottleneck", self.bottleneck)
        check_choice("activation", self.activation, ACTIVATIONS)


@with_args
@dataclass
class BiasPart(ScoredPart):
    """BitFit / Add: a trainable vector added to the output of each targeted module (a delta on its bias, or a new
    bias on bias-free modules)."""

    operation: str = _tag("bias")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_strategy != "random" and self.mask == "adjacent":
            raise ValueError(f"{self._owner}: an adjacent mask on a bias vector trains its first entries (a vector is "
                             "one line); use mask='discrete' with a mask_strategy.")
        if self.mask_axis != 0:
            raise ValueError(f"{self._owner}: `mask_axis`={self.mask_axis!r}, but a bias vector is one line: only 0.")


@with_args
@dataclass
class DeltaPart(ScoredPart):
    """Sparse fine-tuning of the base weights themselves: `f(h; W + W~)` (diff pruning, SHiRA)."""

    operation: str = _tag("delta")


PART_CLASSES: dict[str, type[BasePart]] = {
    c.operation: c for c in (PromptPart, LoraPart, AdapterPart, BiasPart, DeltaPart)
}
# adapter_config.json holds every field of every operation on every part, in this order (peft-apet 0.1's format).
SAVED_FIELDS = (
    "operation", "target_modules", "exclude_modules", "mask", "mask_axis", "num_trainable_params", "density", "r",
    "lora_alpha", "lora_dropout", "bottleneck", "activation", "num_virtual_tokens", "prompt_init", "prompt_init_text",
    "tokenizer_name_or_path", "mask_pairing", "mask_strategy", "mask_strategy_kwargs", "mask_counts",
)
# Fields added after 0.1, with their defaults: written after `SAVED_FIELDS`, and only by a part that sets another
# value, so that every config that does not use them keeps writing the same adapter_config.json bytes as before (and
# stays readable by older peft-apet). A new field of a part goes here, never into `SAVED_FIELDS`.
SAVED_IF_SET: dict[str, Any] = {"delta_dropout": 0.0}
PART_FIELDS = (*SAVED_FIELDS, *SAVED_IF_SET)  # every field a part may have, in the saved order
# Values saved for a field the part's operation does not have, besides None; the first one is what `to_dict`
# writes. They are accepted and dropped on reading. ("independent": a 0.1 part read by `check_kwargs` and saved.)
_ABSENT: dict[str, tuple[str, ...]] = {"mask_pairing": ("aligned", "independent"), "mask_strategy": ("random",)}


def _declaring_class(name: str) -> type[BasePart]:
    """The part class (base, mixin or operation) that declares field `name`."""
    return next(c for c in (BasePart, PairedPart, ScoredPart, *PART_CLASSES.values())
                if name in inspect.get_annotations(c))


def _build_part(kwargs: dict[str, Any]) -> BasePart:
    """The part of `kwargs["operation"]`, with fields of other operations dropped if they hold no setting."""
    operation = kwargs.pop("operation", "lora")
    check_choice("operation", operation, OPERATIONS)
    part_class = PART_CLASSES[operation]
    own = {f.name for f in fields(part_class)}
    for name in [name for name in kwargs if name not in own]:
        value = kwargs.pop(name)
        if value is not None and not (isinstance(value, str) and value in _ABSENT.get(name, ())):
            raise _declaring_class(name)._misplaced(operation, name, value)
    return part_class(operation=operation, **kwargs)


class APETPart(abc.ABC):  # noqa: B024 (no abstract methods: an ABC for `register`, so isinstance holds)
    """A part of an APET adapter as `adapter_config.json` stores it: builds the part class of its operation.

    `APETPart(operation="lora", r=4, mask="discrete", density=0.1)` returns a `LoraPart`; `isinstance(part, APETPart)`
    holds for every part class. Fields of other operations may be given as None (0.1 files store every field on
    every part); a setting for one raises a ValueError naming the field and the operations that have it.
    `dataclasses.fields(APETPart)` lists every field a part may have, in the saved order.

    Args:
        operation: One of "prompt", "lora", "adapter", "bias", "delta" (default "lora").
        **fields: The fields of that operation's part class: `PromptPart`, `LoraPart`, `AdapterPart`, `BiasPart`,
            `DeltaPart` (see their docstrings).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> BasePart:
        cls.check_kwargs(**kwargs)
        return _build_part(dict(cls.__signature__.bind(*args, **kwargs).arguments))

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict:
        """Refuse unknown fields with an `UnknownFieldError` (TypeError and ValueError) listing the allowed ones."""
        unknown = sorted(set(kwargs) - set(PART_FIELDS))
        if unknown:
            raise UnknownFieldError(f"APETPart has no fields {unknown}; allowed: {list(PART_FIELDS)}.")
        return kwargs


APETPart.register(BasePart)
APETPart.__dataclass_fields__ = {name: _declaring_class(name).__dataclass_fields__[name] for name in PART_FIELDS}
# peft-apet 0.1's signature of APETPart, then the later fields (None: the operation's default, or a field it does not
# have).
_SHOWN_DEFAULTS = {"operation": "lora", "mask_axis": 0, "mask_pairing": "aligned", "mask_strategy": "random"}
APETPart.__signature__ = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_SHOWN_DEFAULTS.get(name))
    for name in PART_FIELDS
])



def refuse_unknown_fields(init: Callable) -> Callable:
    """`init` (a dataclass `__init__`) that first refuses unknown keywords with `check_kwargs`."""
    # PEFT's loader catches a TypeError saying "got an unexpected keyword argument", warns and drops those keys;
    # `UnknownFieldError` does not say that, so an adapter saved by a newer peft-apet is never loaded with some of
    # its settings silently ignored.
    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        type(self).check_kwargs(**kwargs)
        init(self, *args, **kwargs)

    return checked_init


for _cls in PART_CLASSES.values():
    _cls.__init__ = refuse_unknown_fields(_cls.__init__)
