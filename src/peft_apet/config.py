"""`APETConfig`: what to train, where, and how many parameters.

An APET adapter is a list of *parts*. Each part is one of the paper's operations (eqs. 14-17) applied to a
set of modules, optionally masked down to an exact number of trainable entries:

| operation | formula                         | classic special case |
|-----------|---------------------------------|----------------------|
| `bias`    | `f(h) + W~1`                    | BitFit               |
| `delta`   | `f(h; W + W~)`                  | diff pruning / SHiRA |
| `prompt`  | `f([W~2; X])`                   | Prompt tuning        |
| `lora`    | `f(h) + a·h·W~3·W~4`            | LoRA                 |
| `adapter` | `f(h) + σ(f(h)·W~5)·W~6`        | Houlsby Adapter      |

Every `W~ = W ⊙ m`: `mask=None` trains the whole tensor, `"adjacent"` whole lines (rows or columns) and
`"discrete"` scattered entries. See `peft_apet.budget` for how a budget is split.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from peft import PeftConfig
from peft.utils import TaskType

from .operations import MERGEABLE_OPERATIONS, PAIRED_OPERATIONS, SCORED_OPERATIONS
from .strategies import check_mask_strategy

OPERATIONS = ("prompt", "lora", "adapter", "bias", "delta")
MASKS = ("adjacent", "discrete")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity")
PROMPT_INITS = ("random", "text")
SELECTION_SCOPES = ("module", "global")
# How the masks of a two-matrix part (lora A/B, adapter down/up) relate; see `peft_apet.masks.aligned_pair_masks`.
MASK_PAIRINGS = ("aligned", "independent")

# Fields that only make sense for one operation, with the default filled in when that operation is used.
_OPERATION_FIELDS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "lora_alpha": 8.0, "lora_dropout": 0.0},
    "adapter": {"bottleneck": 24, "activation": "relu"},
    "prompt": {"num_virtual_tokens": 20, "prompt_init": "random", "prompt_init_text": None,
               "tokenizer_name_or_path": None},
}


class UnknownFieldError(TypeError, ValueError):
    """An unknown keyword given to `APETPart` / `APETConfig` (or found in an `adapter_config.json`).

    A `TypeError` like any Python call with an unexpected keyword (PEFT's configs and PEFT's tests rely on that),
    and a `ValueError` like every other invalid setting of peft-apet. Its message never contains "got an unexpected
    keyword argument", so PEFT's loader does not take it for a field it may drop: an adapter saved by a newer
    peft-apet is refused, not loaded with some settings silently ignored.
    """


class APETPeftType(str, enum.Enum):
    """PEFT type of APET adapters. A `str` enum, so `"APET"` read back from `adapter_config.json` finds it."""

    APET = "APET"


def _check_choice(name: str, value: Any, allowed: tuple, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # `True in (0, 1)` and `1.0 in (0, 1)` hold in Python: compare types as well as values.
    if not any(type(value) is type(a) and value == a for a in allowed):
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be one of {list(allowed)}{extra}, got {value!r}.")


def _check_budget(owner: str, num_trainable_params: Any, density: Any) -> None:
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


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a str or None, got {value!r}.")


def _check_json_dict(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict with str keys, got {value!r}.")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must hold JSON values (it is saved in adapter_config.json): {e}") from e


def _checked_token_ids(name: str, value: Any) -> list[int]:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
        raise ValueError(f"{name} must be a non-empty list of token ids (ints >= 0), got {value!r}.")
    repeated = sorted({i for i in value if list(value).count(i) > 1})
    if repeated:
        raise ValueError(f"{name} repeats token ids {repeated}; give each id once.")
    return list(value)


def _checked_token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """`trainable_token_indices` checked: None, a list of distinct ids >= 0, or a dict module name -> such a list."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ValueError("`trainable_token_indices` as a dict must map module names (non-empty str) to token ids, "
                             f"got {value!r}.")
        return {k: _checked_token_ids(f"`trainable_token_indices[{k!r}]`", v) for k, v in value.items()}
    return _checked_token_ids("`trainable_token_indices`", value)


def _check_target_modules(name: str, value: Any) -> None:
    if value is None or isinstance(value, str) and value:
        return
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ValueError(
        f"`{name}` must be None (the model type's default), a non-empty regex string or a non-empty list of "
        f"module-name suffixes, got {value!r}."
    )


@dataclass
class APETPart:
    """One operation of an APET adapter, applied to a set of modules, optionally masked.

    Fields that belong to another operation (for example `r` on a `bias` part) must be left `None`.
    """

    operation: str = field(default="lora", metadata={"help": f"One of {list(OPERATIONS)}."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules this part acts on: a list of name suffixes, a regex (full match) or 'all-linear'. "
            "None uses the default for the model type (see `peft_apet.targets`). Ignored by `prompt`, which "
            "always acts on the input embedding."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to leave out, same syntax as `target_modules`."}
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
    r: int | None = field(default=None, metadata={"help": "lora: rank of the low-rank path (default 8)."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "lora: the path is scaled by lora_alpha / r, as in PEFT (default 8)."}
    )
    lora_dropout: float | None = field(
        default=None, metadata={"help": "lora: dropout on the input of the low-rank path (default 0.0)."}
    )
    bottleneck: int | None = field(
        default=None, metadata={"help": "adapter: bottleneck width of the plug-in (default 24)."}
    )
    activation: str | None = field(
        default=None, metadata={"help": f"adapter: the non-linearity σ, one of {list(ACTIVATIONS)} (default relu)."}
    )
    num_virtual_tokens: int | None = field(
        default=None, metadata={"help": "prompt: number of soft tokens prepended to the input (default 20)."}
    )
    prompt_init: str | None = field(
        default=None,
        metadata={"help": "prompt: 'random' (N(0, 1), as PEFT) or 'text' (embeddings of `prompt_init_text`)."},
    )
    prompt_init_text: str | None = field(
        default=None, metadata={"help": "prompt: text whose token embeddings initialise the prompt."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "prompt: tokenizer used to encode `prompt_init_text`."}
    )
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
    mask_counts: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Written by mask selection, leave None: the trainable entries of each module (by module name) "
            "as a strategy chose them. With selection_scope='global' they differ from the planned split; a saved "
            "adapter reloads with these shapes (its masks come from the checkpoint) without recalibrating."
        },
    )

    def __post_init__(self) -> None:
        _check_choice("operation", self.operation, OPERATIONS)
        owner = f"part '{self.operation}'"
        for op, defaults in _OPERATION_FIELDS.items():
            for name, default in defaults.items():
                if op == self.operation:
                    if getattr(self, name) is None:
                        setattr(self, name, default)
                elif getattr(self, name) is not None:
                    raise ValueError(
                        f"{owner}: `{name}` is only used by operation '{op}'; leave it None for '{self.operation}'."
                    )
        _check_choice("mask", self.mask, MASKS, allow_none=True)
        _check_choice("mask_axis", self.mask_axis, (0, 1))
        _check_choice("mask_pairing", self.mask_pairing, MASK_PAIRINGS)
        if (self.operation in PAIRED_OPERATIONS and self.mask == "adjacent" and self.mask_pairing == "aligned"
                and self.mask_axis != 0):
            raise ValueError(
                f"{owner}: mask_axis={self.mask_axis} with mask_pairing='aligned': aligned adjacent masks train whole "
                "rank units (rows of the first matrix, columns of the second), so `mask_axis` must be 0; set "
                "mask_pairing='independent' to mask columns of both matrices."
            )
        _check_budget(owner, self.num_trainable_params, self.density)
        has_budget = self.num_trainable_params is not None or self.density is not None
        if has_budget and self.mask is None:
            raise ValueError(f"{owner}: a budget needs `mask` set to one of {list(MASKS)}.")
        _check_target_modules("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_target_modules("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.operation == "prompt" and self.target_modules is not None:
            raise ValueError("part 'prompt': `target_modules` must be None; prompts act on the input embedding.")
        if self.operation == "lora":
            _check_positive_int("r", self.r)
            if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                    or not math.isfinite(self.lora_alpha)):
                raise ValueError(f"`lora_alpha` must be a finite number, got {self.lora_alpha!r}.")
            if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                    or not 0.0 <= self.lora_dropout < 1.0):
                raise ValueError(f"`lora_dropout` must be a float in [0, 1), got {self.lora_dropout!r}.")
        if self.operation == "adapter":
            _check_positive_int("bottleneck", self.bottleneck)
            _check_choice("activation", self.activation, ACTIVATIONS)
        if self.operation == "prompt":
            _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
            _check_choice("prompt_init", self.prompt_init, PROMPT_INITS)
            _check_optional_str("prompt_init_text", self.prompt_init_text)
            _check_optional_str("tokenizer_name_or_path", self.tokenizer_name_or_path)
            if self.prompt_init == "text" and not (self.prompt_init_text and self.tokenizer_name_or_path):
                raise ValueError(
                    "part 'prompt': prompt_init='text' needs `prompt_init_text` and `tokenizer_name_or_path`."
                )
        self._check_mask_strategy(owner)

    def _check_mask_strategy(self, owner: str) -> None:
        if not isinstance(self.mask_strategy, str) or not self.mask_strategy:
            raise ValueError(f"{owner}: `mask_strategy` must be a non-empty str, got {self.mask_strategy!r}.")
        if self.mask_strategy_kwargs is not None:
            _check_json_dict(f"{owner}: `mask_strategy_kwargs`", self.mask_strategy_kwargs)
            self.mask_strategy_kwargs = dict(self.mask_strategy_kwargs)
        if self.mask_strategy == "random":
            if self.mask_strategy_kwargs or self.mask_counts is not None:
                raise ValueError(f"{owner}: `mask_strategy_kwargs` and `mask_counts` belong to a non-random "
                                 "`mask_strategy`; leave them None for 'random'.")
            return
        if self.operation not in SCORED_OPERATIONS:
            raise ValueError(
                f"{owner}: mask_strategy={self.mask_strategy!r} ranks entries of tensors that start at zero on top of "
                f"pre-trained weights ({list(SCORED_OPERATIONS)} parts). A '{self.operation}' tensor is new: its "
                "entries have no pre-trained value or gradient to rank them by (LoRA A / adapter down get no "
                "gradient while the zero-initialised second matrix blocks it). Use mask_strategy='random'."
            )
        if self.mask is None:
            raise ValueError(f"{owner}: mask_strategy={self.mask_strategy!r} chooses entries of a mask; set `mask` "
                             "('discrete') and a budget.")
        if self.operation == "bias" and self.mask == "adjacent":
            raise ValueError(f"{owner}: an adjacent mask on a bias vector trains its first entries (a vector is one "
                             "line); use mask='discrete' with a mask_strategy.")
        if self.mask_counts is not None:
            if not isinstance(self.mask_counts, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in self.mask_counts.items()):
                raise ValueError(f"{owner}: `mask_counts` must map module names to non-negative ints, got "
                                 f"{self.mask_counts!r}.")
            self.mask_counts = dict(self.mask_counts)
            return  # the masks were chosen already and live in the checkpoint: the strategy need not be known here

        check_mask_strategy(self.mask_strategy, self.mask_strategy_kwargs or {}, owner)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict:
        """Refuse unknown fields with an `UnknownFieldError` (TypeError and ValueError) listing the allowed ones."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise UnknownFieldError(f"APETPart has no fields {unknown}; allowed: {[f.name for f in fields(cls)]}.")
        return kwargs

    @property
    def mergeable(self) -> bool:
        """Whether this part can be folded into the base weights (`lora`, `bias`, `delta`)."""
        return self.operation in MERGEABLE_OPERATIONS


@dataclass
class APETConfig(PeftConfig):
    """Configuration of an APET adapter: one or more `APETPart`s and an optional exact total budget.

    Budget rule (`peft_apet.budget.split_config_budget`): parts without a mask train all their entries; parts
    with their own `num_trainable_params`/`density` take exactly that; a config-level budget is the exact
    total of all parts, and what the other parts leave of it is split across the remaining masked parts in
    proportion to their capacity (largest remainders, ties in model order).

    Build configs with the presets: `APETConfig.prompt`, `.lora`, `.adapter`, `.bitfit`, `.delta`, and
    `APETConfig.combine(...)` for several parts in one adapter.
    """

    parts: list[APETPart] = field(
        default_factory=list, metadata={"help": "The parts of the adapter (at most one per operation)."}
    )
    num_trainable_params: int | None = field(
        default=None, metadata={"help": "Exact total number of trainable adapter entries (not modules_to_save)."}
    )
    density: float | None = field(
        default=None, metadata={"help": "Total budget as a fraction in (0, 1] of the masked parts' capacity."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of mask sampling and initialisation (per module)."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: identity at init (zero deltas/up-projections). False: random, for testing."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved besides the adapter (e.g. a new head)."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Embedding rows trained in full besides the parts, as PEFT's LoRA offers (e.g. for new special "
            "tokens): a list of token ids of the input embedding, or a dict of module name (suffix, as PEFT matches "
            "it) -> token ids. Applied with PEFT's `TrainableTokensWrapper`; the rows count in the budget "
            "(ids x embedding dim), are saved alone (not the whole embedding) and merge into the embedding."
        },
    )
    selection_scope: str = field(
        default="module",
        metadata={
            "help": "For parts with a non-random `mask_strategy`: 'module' keeps every module's planned number of "
            "entries and ranks entries within each module; 'global' ranks all entries of a part across its modules "
            "(Fu et al.), so each part keeps its exact total but modules get what their scores earn (recorded in "
            "the part's `mask_counts`). 'global' needs discrete masks."
        },
    )

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise ValueError(f"`task_type` must be one of {[t.value for t in TaskType]}, got {self.task_type!r}.")
        super().__post_init__()
        self.peft_type = APETPeftType.APET
        if not isinstance(self.parts, (list, tuple)) or not self.parts:
            raise ValueError("`parts` must be a non-empty list of APETPart (or dicts); use a preset such as "
                             "APETConfig.lora(...).")
        parts = []
        for part in self.parts:
            if isinstance(part, dict):
                part = APETPart(**part)  # raises ValueError for unknown fields
            if not isinstance(part, APETPart):
                raise ValueError(f"`parts` entries must be APETPart or dict, got {type(part).__name__}.")
            parts.append(part)
        self.parts = parts
        operations = [p.operation for p in parts]
        duplicated = sorted({op for op in operations if operations.count(op) > 1})
        if duplicated:
            raise ValueError(f"`parts` has duplicated operations {duplicated}; each operation may appear once.")
        _check_budget("APETConfig", self.num_trainable_params, self.density)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}.")
        for name in ("init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        _check_optional_str("base_model_name_or_path", self.base_model_name_or_path)
        _check_optional_str("revision", self.revision)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(f"`modules_to_save` must be a list of module names, got {self.modules_to_save!r}.")
            self.modules_to_save = list(self.modules_to_save)
        self.trainable_token_indices = _checked_token_indices(self.trainable_token_indices)
        _check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        if self.selection_scope == "global":
            scored = [p for p in parts if p.mask_strategy != "random"]
            if not scored:
                raise ValueError("selection_scope='global' ranks entries by a mask strategy: set `mask_strategy` "
                                 f"(e.g. 'sam') on a {list(SCORED_OPERATIONS)} part.")
            adjacent = [p.operation for p in scored if p.mask == "adjacent"]
            if adjacent:
                raise ValueError(f"selection_scope='global' needs discrete masks; parts {adjacent} are adjacent "
                                 "(whole lines of different lengths per module). Use selection_scope='module'.")
        if self.part("prompt") is not None and self.task_type is None:
            raise ValueError(
                "A 'prompt' part needs `task_type` (e.g. 'SEQ_CLS', 'CAUSAL_LM', 'SEQ_2_SEQ_LM'): without it PEFT "
                "calls the base model directly and the prompt would silently do nothing."
            )

    # PEFT's injection code reads `target_modules`; APET resolves targets per part (see `peft_apet.plan`).
    @property
    def target_modules(self) -> None:
        return None

    @property
    def operations(self) -> list[str]:
        """The operations of the parts, in order."""
        return [p.operation for p in self.parts]

    def part(self, operation: str) -> APETPart | None:
        """The part with this operation, or None."""
        return next((p for p in self.parts if p.operation == operation), None)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peft_type"] = APETPeftType.APET.value
        if out["modules_to_save"] is not None:
            # PeftModelForSequenceClassification appends its head names on every load: save each name once, so
            # that save -> load -> save writes the same adapter_config.json.
            out["modules_to_save"] = list(dict.fromkeys(out["modules_to_save"]))
        if out["trainable_token_indices"] is None:
            del out["trainable_token_indices"]  # adapters without token rows stay readable by peft-apet 0.1
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> APETConfig:
        """PEFT's `from_pretrained`, with errors that name the file."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as e:
            raise ValueError(f"{os.path.join(folder, 'adapter_config.json')}: {e}") from e
        return config

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse fields this version does not know (a config from a newer peft-apet) instead of dropping them."""
        peft_type = kwargs.get("peft_type", APETPeftType.APET.value)
        if peft_type != APETPeftType.APET.value:
            raise ValueError(f"this is a {peft_type} adapter, not an APET one: load it with PEFT "
                             "(`PeftModel.from_pretrained(base, folder)` or `PeftConfig.from_pretrained(folder)`).")
        known = {f.name for f in fields(cls)} | {"auto_mapping", "peft_version", "runtime_config"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UnknownFieldError(
                f"APETConfig has no fields {unknown}; allowed: {sorted(known)}. If they come from an "
                "adapter_config.json, it was probably saved by a newer peft-apet: upgrade with "
                "`pip install -U peft-apet` rather than load it with those settings silently ignored."
            )
        parts = kwargs.get("parts")
        if isinstance(parts, list):  # PEFT's `from_pretrained` builds the config from what this returns
            # a part saved before mask pairing existed (peft-apet 0.1) drew its masks independently
            kwargs = {**kwargs, "parts": [{"mask_pairing": "independent", **p} if isinstance(p, dict) else p
                                          for p in parts]}
        return kwargs

    # ----------------------------------------------------------------- presets
    @classmethod
    def _single(cls, part_kwargs: dict, config_kwargs: dict) -> APETConfig:
        return cls(parts=[APETPart(**part_kwargs)], **config_kwargs)

    @classmethod
    def prompt(
        cls,
        num_virtual_tokens: int = 20,
        prompt_init: str = "random",
        prompt_init_text: str | None = None,
        tokenizer_name_or_path: str | None = None,
        mask: str | None = None,
        mask_axis: int = 0,
        num_trainable_params: int | None = None,
        density: float | None = None,
        **config_kwargs: Any,
    ) -> APETConfig:
        """Prompt tuning (Lester et al.): `num_virtual_tokens` soft tokens prepended to the input sequence.

        The prompt table has shape `(num_virtual_tokens, embedding_dim)`; a mask trains a subset of it.
        Needs `task_type=` ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", ...).
        """
        part = dict(operation="prompt", num_virtual_tokens=num_virtual_tokens, prompt_init=prompt_init,
                    prompt_init_text=prompt_init_text, tokenizer_name_or_path=tokenizer_name_or_path, mask=mask,
                    mask_axis=mask_axis, num_trainable_params=num_trainable_params, density=density)
        return cls._single(part, config_kwargs)

    @classmethod
    def lora(
        cls,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        mask: str | None = None,
        mask_axis: int = 0,
        num_trainable_params: int | None = None,
        density: float | None = None,
        exclude_modules: list[str] | str | None = None,
        mask_pairing: str = "aligned",
        **config_kwargs: Any,
    ) -> APETConfig:
        """LoRA (Hu et al.): `h + (lora_alpha / r) · dropout(h) A^T B^T` with A `(r, in)`, B `(out, r)`.

        With a mask, `mask_pairing="aligned"` (default) draws A's and B's masks on shared rank units so that every
        trainable entry can learn; `"independent"` draws them apart, as in the APET paper."""
        part = dict(operation="lora", r=r, lora_alpha=float(lora_alpha), lora_dropout=float(lora_dropout),
                    target_modules=target_modules, exclude_modules=exclude_modules, mask=mask, mask_axis=mask_axis,
                    num_trainable_params=num_trainable_params, density=density, mask_pairing=mask_pairing)
        return cls._single(part, config_kwargs)

    @classmethod
    def adapter(
        cls,
        bottleneck: int = 24,
        activation: str = "relu",
        target_modules: list[str] | str | None = None,
        mask: str | None = None,
        mask_axis: int = 0,
        num_trainable_params: int | None = None,
        density: float | None = None,
        exclude_modules: list[str] | str | None = None,
        mask_pairing: str = "aligned",
        **config_kwargs: Any,
    ) -> APETConfig:
        """Houlsby adapter: `y + σ(y W_down^T) W_up^T` after each targeted module's output `y`.

        W_down is `(bottleneck, d)`, W_up `(d, bottleneck)`; defaults place it after the attention output
        projection and the feed-forward output projection of every block. `mask_pairing` as for `lora`.
        """
        part = dict(operation="adapter", bottleneck=bottleneck, activation=activation, target_modules=target_modules,
                    exclude_modules=exclude_modules, mask=mask, mask_axis=mask_axis,
                    num_trainable_params=num_trainable_params, density=density, mask_pairing=mask_pairing)
        return cls._single(part, config_kwargs)

    @classmethod
    def bitfit(
        cls,
        target_modules: list[str] | str | None = None,
        mask: str | None = None,
        num_trainable_params: int | None = None,
        density: float | None = None,
        exclude_modules: list[str] | str | None = None,
        mask_strategy: str = "random",
        mask_strategy_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> APETConfig:
        """BitFit (Ben Zaken et al.): a trainable vector added to the output of every module that has a bias.

        Trains a delta on each existing bias (mergeable into it). On bias-free models (T5, Llama) the default
        targets are the attention and feed-forward projections, which get new bias vectors (the Add operation).
        With a discrete mask, `mask_strategy` picks which bias entries train (see `peft_apet.selection`).
        """
        part = dict(operation="bias", target_modules=target_modules, exclude_modules=exclude_modules, mask=mask,
                    num_trainable_params=num_trainable_params, density=density, mask_strategy=mask_strategy,
                    mask_strategy_kwargs=mask_strategy_kwargs)
        return cls._single(part, config_kwargs)

    @classmethod
    def delta(
        cls,
        target_modules: list[str] | str | None = None,
        mask: str | None = "discrete",
        mask_axis: int = 0,
        num_trainable_params: int | None = None,
        density: float | None = None,
        exclude_modules: list[str] | str | None = None,
        mask_strategy: str = "random",
        mask_strategy_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> APETConfig:
        """Sparse fine-tuning of the base weights themselves: `f(h; W + W~)` (diff pruning, Fu et al., SHiRA).

        Needs a budget (`num_trainable_params` or `density`, here or on the config) unless `mask=None`.
        `mask_strategy` picks the trained entries: "random", "magnitude", or from data "gradient", "fisher", "sam"
        (then call `peft_apet.calibrate_masks`); `selection_scope="global"` ranks them across modules.
        """
        part = dict(operation="delta", target_modules=target_modules, exclude_modules=exclude_modules, mask=mask,
                    mask_axis=mask_axis, num_trainable_params=num_trainable_params, density=density,
                    mask_strategy=mask_strategy, mask_strategy_kwargs=mask_strategy_kwargs)
        return cls._single(part, config_kwargs)

    @classmethod
    def combine(cls, *configs: APETConfig, **config_kwargs: Any) -> APETConfig:
        """One adapter made of the parts of several (single-part) configs, e.g. the unified form of eq. 17.

        Config-level settings (`num_trainable_params`, `task_type`, `seed`, ...) come from `config_kwargs`,
        not from the combined configs.
        """
        parts = [APETPart(**asdict(p)) for c in configs for p in c.parts]
        return cls(parts=parts, **config_kwargs)


def _refuse_unknown_fields(init):
    # PEFT's loader catches a TypeError saying "got an unexpected keyword argument", warns and drops those keys;
    # `UnknownFieldError` does not say that, so an adapter saved by a newer peft-apet is never loaded with some of
    # its settings silently ignored.
    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        type(self).check_kwargs(**kwargs)
        init(self, *args, **kwargs)

    return checked_init


APETPart.__init__ = _refuse_unknown_fields(APETPart.__init__)
APETConfig.__init__ = _refuse_unknown_fields(APETConfig.__init__)
