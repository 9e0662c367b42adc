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

The parts themselves, one class per operation, are in `peft_apet.parts`.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from peft import PeftConfig
from peft.utils import TaskType

from .operations import SCORED_OPERATIONS
from .parts import (
    AdapterPart,
    APETPart,
    BasePart,
    BiasPart,
    DeltaPart,
    LoraPart,
    PromptPart,
    UnknownFieldError,
    _declaring_class,
    args_block,
    check_budget,
    check_choice,
    check_optional_str,
    refuse_unknown_fields,
    with_args,
)

SELECTION_SCOPES = ("module", "global")
BUDGET_SPLIT_VERSIONS = (1, 2)
BUDGET_SPLIT_VERSION = 2  # of new configs; see `APETConfig.budget_split_version`


class APETPeftType(str, enum.Enum):
    """PEFT type of APET adapters. A `str` enum, so `"APET"` read back from `adapter_config.json` finds it."""

    APET = "APET"


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


# ---------------------------------------------------------------------------------------------- presets
def _preset_fields(part_class: type[BasePart]) -> list:
    """The fields a preset of `part_class` takes, in the presets' order: the operation's own settings, then those
    of every part, then those of its mixin (pairing or scoring)."""
    own, common = inspect.get_annotations(part_class), {f.name for f in fields(BasePart)}

    def rank(f) -> int:
        return 0 if f.name in own else 1 if f.name in common else 2

    return sorted((f for f in fields(part_class) if f.name not in ("operation", "mask_counts")), key=rank)


def _check_preset_kwargs(part_class: type[BasePart], config_kwargs: dict[str, Any], own: list[str]) -> None:
    """Refuse a preset keyword that is neither its part's nor a config field: a field of other parts gets their
    error (which parts use it), anything else the preset's and the config's names."""
    config_fields = {f.name for f in fields(APETConfig)}
    operation = part_class.__dataclass_fields__["operation"].default
    for name, value in config_kwargs.items():
        if name in config_fields:
            continue
        declaring = None
        try:
            declaring = _declaring_class(name)
        except StopIteration:
            pass
        if declaring is not None and not issubclass(part_class, declaring):
            raise declaring._misplaced(operation, name, value)
        if declaring is not None:  # a field of this part that the preset leaves out
            raise ValueError(f"the {operation} preset does not take `{name}` (got {name}={value!r}); its own: {own}.")
        raise UnknownFieldError(f"APETConfig.{operation} preset has no fields [{name!r}]; allowed: "
                                f"{own + sorted(config_fields - set(_NOT_COMBINED) - set(own))}.")


class _Preset(classmethod):
    """A preset `APETConfig.<name>(**part_fields, **config_kwargs)`: a config of one part of `part_class`.

    Its parameters are the part class's fields with their defaults (`defaults` overrides some, `leave_out` drops
    some), so `inspect.signature` and `help()` show them; `as_float` fields are stored as floats.
    """

    def __init__(self, part_class: type[BasePart], summary: str, leave_out: tuple[str, ...] = (),
                 as_float: tuple[str, ...] = (), **defaults: Any) -> None:
        part_fields = [f for f in _preset_fields(part_class) if f.name not in leave_out]
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params = [inspect.Parameter(f.name, kind, default=defaults.get(f.name, f.default), annotation=f.type)
                  for f in part_fields]
        params.append(inspect.Parameter("config_kwargs", inspect.Parameter.VAR_KEYWORD, annotation="Any"))
        signature = inspect.Signature(params, return_annotation="APETConfig")

        def preset(cls: type[APETConfig], *args: Any, **kwargs: Any) -> APETConfig:
            values = signature.bind(*args, **kwargs)
            values.apply_defaults()
            part = dict(values.arguments)
            config_kwargs = part.pop("config_kwargs")
            part.update((name, float(part[name])) for name in as_float)
            _check_preset_kwargs(part_class, config_kwargs, [p.name for p in params[:-1]])
            return cls(parts=[part_class(**part)], **config_kwargs)

        preset.__signature__ = signature.replace(parameters=[inspect.Parameter("cls", kind), *params])
        args = [(f.name, f.metadata["help"]) for f in part_fields]
        args.append(("**config_kwargs", "Fields of `APETConfig` (`task_type`, `num_trainable_params`, `density`, "
                                        "`seed`, ...)."))
        returns = f"Returns:\n    An APETConfig of one {part_class.__name__}."
        preset.__doc__ = f"{inspect.cleandoc(summary)}\n\n{args_block(args)}\n\n{returns}"
        super().__init__(preset)

    def __set_name__(self, owner: type, name: str) -> None:
        self.__func__.__name__, self.__func__.__qualname__ = name, f"{owner.__name__}.{name}"



@functools.partial(with_args, skip=("task_type", "peft_type", "auto_mapping", "peft_version",
                                   "base_model_name_or_path", "revision", "inference_mode"),
                   extra=(("task_type", "PEFT's task type ('SEQ_CLS', 'CAUSAL_LM', 'SEQ_2_SEQ_LM', ...); a prompt part "
                                        "needs one. The other fields of `PeftConfig` work as for any PEFT method."),))
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

    budget_split_version: int = field(
        default=BUDGET_SPLIT_VERSION,
        metadata={
            "help": "Version of the rule that splits a part's budget across its modules (`peft_apet.plan`), kept "
            "so that saved adapters reload with their shapes. 2 (default): where an aligned two-matrix part would "
            "leave a module one entry without a partner and no other module can take that entry, the module takes "
            "a partner's entry from another module. 1: the rule of adapters saved by peft-apet 0.1 and 0.2.0.dev0; "
            "loading an adapter_config.json without this field sets it."
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
        check_budget("APETConfig", self.num_trainable_params, self.density)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}.")
        for name in ("init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        check_optional_str("base_model_name_or_path", self.base_model_name_or_path)
        check_optional_str("revision", self.revision)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(f"`modules_to_save` must be a list of module names, got {self.modules_to_save!r}.")
            self.modules_to_save = list(self.modules_to_save)
        self.trainable_token_indices = _checked_token_indices(self.trainable_token_indices)
        check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        check_choice("budget_split_version", self.budget_split_version, BUDGET_SPLIT_VERSIONS)
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
        """The part with this operation, or None.

        Args:
            operation: one of "prompt", "lora", "adapter", "bias", "delta".
        """
        return next((p for p in self.parts if p.operation == operation), None)

    def to_dict(self) -> dict:
        """The config as `adapter_config.json` stores it (every part with the fields of every operation)."""
        out = asdict(self)
        out["parts"] = [p.to_dict() for p in self.parts]
        out["peft_type"] = APETPeftType.APET.value
        if out["modules_to_save"] is not None:
            # PeftModelForSequenceClassification appends its head names on every load: save each name once, so
            # that save -> load -> save writes the same adapter_config.json.
            out["modules_to_save"] = list(dict.fromkeys(out["modules_to_save"]))
        if out["budget_split_version"] == 1:
            del out["budget_split_version"]  # loads back as 1 (`check_kwargs`), and stays readable by peft-apet 0.1
        if out["trainable_token_indices"] is None:
            del out["trainable_token_indices"]  # adapters without token rows stay readable by peft-apet 0.1
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> APETConfig:
        """PEFT's `from_pretrained`, with errors that name the file.

        Args:
            pretrained_model_name_or_path: a folder with `adapter_config.json`, or a Hub repository id.
            subfolder: the adapter's subfolder in it, if any.
            **kwargs: passed to `PeftConfig.from_pretrained` (e.g. `revision`).
        """
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
        # an adapter saved before the field existed split its budget by rule 1; it must reload with those shapes
        kwargs = {"budget_split_version": 1, **kwargs}
        parts = kwargs.get("parts")
        if isinstance(parts, list):  # PEFT's `from_pretrained` builds the config from what this returns
            # a part saved before mask pairing existed (peft-apet 0.1) drew its masks independently
            kwargs = {**kwargs, "parts": [{"mask_pairing": "independent", **p} if isinstance(p, dict) else p
                                          for p in parts]}
        return kwargs

    # ----------------------------------------------------------------- presets
    prompt = _Preset(
        PromptPart,
        """Prompt tuning (Lester et al.): `num_virtual_tokens` soft tokens prepended to the input sequence.

        The prompt table has shape `(num_virtual_tokens, embedding_dim)`; a mask trains a subset of it.
        Needs `task_type=` ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", ...).""",
        leave_out=("target_modules", "exclude_modules"),
    )
    lora = _Preset(
        LoraPart,
        """LoRA (Hu et al.): `h + (lora_alpha / r) · dropout(h) A^T B^T` with A `(r, in)`, B `(out, r)`.

        With a mask, `mask_pairing="aligned"` (default) draws A's and B's masks on shared rank units so that every
        trainable entry can learn; `"independent"` draws them apart, as in the APET paper.""",
        as_float=("lora_alpha", "lora_dropout"),
    )
    adapter = _Preset(
        AdapterPart,
        """Houlsby adapter: `y + σ(y W_down^T) W_up^T` after each targeted module's output `y`.

        W_down is `(bottleneck, d)`, W_up `(d, bottleneck)`; defaults place it after the attention output
        projection and the feed-forward output projection of every block. `mask_pairing` as for `lora`.""",
    )
    bitfit = _Preset(
        BiasPart,
        """BitFit (Ben Zaken et al.): a trainable vector added to the output of every module that has a bias.

        Trains a delta on each existing bias (mergeable into it). On bias-free models (T5, Llama) the default
        targets are the attention and feed-forward projections, which get new bias vectors (the Add operation).
        With a discrete mask, `mask_strategy` picks which bias entries train (see `peft_apet.selection`).""",
        leave_out=("mask_axis",),
    )
    delta = _Preset(
        DeltaPart,
        """Sparse fine-tuning of the base weights themselves: `f(h; W + W~)` (diff pruning, Fu et al., SHiRA).

        Needs a budget (`num_trainable_params` or `density`, here or on the config) unless `mask=None`.
        `mask_strategy` picks the trained entries: "random", "magnitude", or from data "gradient", "fisher", "sam"
        (then call `peft_apet.calibrate_masks`); `selection_scope="global"` ranks them across modules.""",
        mask="discrete",
    )

    @classmethod
    def combine(cls, *configs: APETConfig, **config_kwargs: Any) -> APETConfig:
        """One adapter made of the parts of several (single-part) configs, e.g. the unified form of eq. 17.

        Args:
            *configs: Configs whose parts are copied, in order (at most one part per operation in all).
            **config_kwargs: Config-level settings (`num_trainable_params`, `task_type`, `seed`, ...); those of
                the combined configs are not used, so a combined config that sets one to another value than the
                result has is refused (`ValueError` naming it): pass it here instead.

        Returns:
            An APETConfig with a copy of every part of `configs`.
        """
        parts = [type(p)(**asdict(p)) for c in configs for p in c.parts]  # asdict copies lists and dicts
        combined = cls(parts=parts, **config_kwargs)
        for i, config in enumerate(configs):
            dropped = {f.name: getattr(config, f.name) for f in fields(config)
                       if f.name not in _NOT_COMBINED and getattr(config, f.name) != _default(f)
                       and getattr(config, f.name) != getattr(combined, f.name)}
            if dropped:
                given = ", ".join(f"{k}={v!r}" for k, v in dropped.items())
                raise ValueError(f"APETConfig.combine: config {i} sets {given}: config-level settings, which combine "
                                 f"does not take from its configs; pass them to combine itself: combine(..., {given}).")
        return combined


# Fields of a combined config that are not settings of the user's (PEFT bookkeeping, or the parts themselves).
_NOT_COMBINED = ("parts", "peft_type", "auto_mapping", "peft_version", "revision", "base_model_name_or_path",
                 "inference_mode", "runtime_config")


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default



APETConfig.__init__ = refuse_unknown_fields(APETConfig.__init__)
