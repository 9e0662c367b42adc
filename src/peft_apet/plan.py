"""Planning: which modules get which tensors, of which shape, with how many trainable entries, and which entries.

`plan_adapter(model, config)` reads the model without changing it and returns an `AdapterPlan`; the tuner
builds its layers once from the plan, and `count_trainable_parameters` reports the plan's total so users can
match budgets across methods before touching the model. All errors about targets and budgets are raised
here, before any module is replaced.

Masks: parts with a data-free `mask_strategy` (`magnitude`, registered ones) get their masks chosen here, from the
base weights (`peft_apet.selection`): their `TensorPlan.index` holds the chosen mask, and `AdapterPlan.mask_counts`
the per-module entries the tuner records in `part.mask_counts` (`record_mask_counts`). Every other tensor draws its
mask from its `seed` when it is built. A part whose counts are recorded already (a saved adapter) keeps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .budget import (
    allocate_budget,
    avoid_unpaired_counts,
    density_to_count,
    move_lone_entry,
    split_aligned_pair,
    split_config_budget,
)
from .config import APETConfig, APETPart
from .masks import stable_seed
from .modules import has_bias, is_linear, output_features
from .operations import OPERATIONS, operations_in
from .quantized import check_supported
from .selection import choose_masks, data_free_scores, targets_of_part
from .strategies import data_free_score_fn
from .targets import ALL_LINEAR, ALL_WITH_BIAS, default_target_modules
from .tokens import TOKENS_ROLE, TokenPlan, plan_trainable_tokens

# The heads PEFT's task classes train in full (`PeftModelForSequenceClassification`, `...ForTokenClassification`,
# `...ForQuestionAnswering` add them to `modules_to_save`): never a part's target.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass(frozen=True)
class TensorPlan:
    """One trainable tensor `W~ = W ⊙ m`: its logical shape, mask and number of trainable entries."""

    role: str
    shape: tuple[int, ...]
    mask: str | None
    axis: int
    num_entries: int
    seed: int
    pairing: str | None = None  # "aligned": drawn with its partner matrix (`peft_apet.masks.aligned_pair_masks`)
    # The mask a strategy chose (compact form of `peft_apet.masks`); None: drawn from `seed` when the tensor is built.
    index: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def capacity(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModulePlan:
    """What one module of the model gets: its kind of wrapper and its tensors, by role."""

    name: str
    kind: str  # "linear" (nn.Linear / Conv1D), "embedding" (prompt) or "output" (any module with a feature output)
    features: int  # size of the module's output features (last dim)
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)  # per-operation scalars (scaling, activation, ...)

    @property
    def operations(self) -> list[str]:
        return [op.name for op in operations_in(self.tensors)]


@dataclass
class AdapterPlan:
    modules: dict[str, ModulePlan]
    part_counts: dict[str, int]
    tokens: dict[str, TokenPlan] = field(default_factory=dict)  # trainable token rows (peft_apet.tokens)
    # By operation, for parts whose masks a strategy chose: entries per module (what `part.mask_counts` records).
    mask_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def set_chosen(self, operation: str, chosen: list[tuple[str, TensorPlan]]) -> None:
        """Give part `operation` the masks a strategy chose: `(module name, tensor with its index)` per module."""
        for name, tensor in chosen:
            self.modules[name].tensors[tensor.role] = tensor
        self.mask_counts[operation] = {name: tensor.num_entries for name, tensor in chosen}

    @property
    def num_trainable_params(self) -> int:
        return (sum(t.num_entries for m in self.modules.values() for t in m.tensors.values())
                + sum(t.num_entries for t in self.tokens.values()))

    def summary(self) -> str:
        """A table: module, tensor, shape, mask and trainable entries."""
        rows = [(m.name, t.role, t.shape, t.mask, t.num_entries)
                for m in self.modules.values() for t in m.tensors.values()]
        rows += [(t.name, TOKENS_ROLE, t.shape, None, t.num_entries) for t in self.tokens.values()]
        return summary_table(rows)


def summary_table(rows: list[tuple[str, str, tuple, str | None, int]], learnable: list[int] | None = None) -> str:
    """Format `(module, tensor, shape, mask, trainable)` rows with a total line; `learnable` (per row: trainable
    entries that can receive a gradient) adds a column."""
    extra = (lambda n: f" {n:>10}") if learnable is not None else (lambda n: "")
    learn = learnable if learnable is not None else [0] * len(rows)
    lines = [f"{'module':<60} {'tensor':<13} {'shape':<14} {'mask':<9}{extra('learnable')} {'trainable':>10}"]
    lines += [f"{m:<60} {role:<13} {str(shape):<14} {str(mask):<9}{extra(n)} {k:>10}"
              for (m, role, shape, mask, k), n in zip(rows, learn)]
    lines.append(f"{'total':<99}{extra(sum(learn))} {sum(r[-1] for r in rows):>10}")
    return "\n".join(lines)


def candidate_modules(model: nn.Module, modules_to_save: list[str] | None) -> list[tuple[str, nn.Module]]:
    """`(name, base module)` of every module an APET part may target, in model order.

    Skips the insides of tuner layers and of `modules_to_save` wrappers (so planning on a model that already
    has adapters sees the original modules) and modules listed in `modules_to_save`.
    """
    skip_prefixes: list[str] = []
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            skip_prefixes.append(name + ".")
        if isinstance(module, AuxiliaryTrainingWrapper):
            continue
        if modules_to_save and any(name == m or name.endswith("." + m) for m in modules_to_save):
            skip_prefixes.append(name + ".")
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        out.append((name, base))
    return out


def _output_head_names(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> set[str]:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        return set()
    head = head.get_base_layer() if isinstance(head, BaseTunerLayer) else head
    return {name for name, module in candidates if module is head}


def prompt_embedding_name(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> str:
    """Name of the input embedding that soft prompts go through (the encoder's, for encoder-decoders)."""
    embedding = None
    try:  # an encoder's own embedding where there is one (T5, also T5EncoderModel, whose `shared` it only ties to)
        embedding = model.get_encoder().get_input_embeddings()
    except (AttributeError, NotImplementedError, TypeError):  # BertEncoder has none; some models no get_encoder
        pass
    if embedding is None and hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
    if isinstance(embedding, BaseTunerLayer):
        embedding = embedding.get_base_layer()
    for name, module in candidates:
        if module is embedding:
            return name
    raise ValueError("part 'prompt': the model exposes no input embedding (`get_input_embeddings()`).")


def resolve_targets(
    model: nn.Module, part: APETPart, candidates: list[tuple[str, nn.Module]], modules_to_save: list[str] | None
) -> list[tuple[str, nn.Module]]:
    """The modules a part acts on, checked to be of a kind the operation supports."""
    operation = OPERATIONS[part.operation]
    if operation.acts_on == "input_embedding":
        name = prompt_embedding_name(model, candidates)
        module = dict(candidates)[name]
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"part 'prompt': the input embedding {name} is a {type(module).__name__}, "
                             "not an nn.Embedding.")
        return [(name, module)]

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = part.target_modules if part.target_modules is not None else default_target_modules(
        model_type, part.operation)
    heads = _output_head_names(model, candidates)
    special = (ALL_LINEAR, ALL_WITH_BIAS)
    exclude = part.exclude_modules
    matcher = SimpleNamespace(target_modules=targets, exclude_modules=None if exclude in special else exclude,
                              modules_to_save=modules_to_save, target_parameters=None)
    unfiltered = SimpleNamespace(target_modules=targets, exclude_modules=None, modules_to_save=None,
                                 target_parameters=None)
    chosen, excluded = [], []
    for name, module in candidates:
        hit = check_target_module_exists(matcher, name)  # an _ExcludedModule (falsy) when `exclude` matches
        if targets in special:
            hit = not isinstance(hit, _ExcludedModule) and _in_special_set(targets, name, module, heads)
        if exclude in special and _in_special_set(exclude, name, module, heads):
            hit = False
        if hit:
            chosen.append((name, module))
        elif (_in_special_set(targets, name, module, heads) if targets in special
              else check_target_module_exists(unfiltered, name)):
            excluded.append(name)  # a target, left out by `exclude_modules` or `modules_to_save`
    if not chosen and excluded:
        raise ValueError(f"part '{part.operation}': `target_modules`={targets!r} matches {_names_of(excluded)}, but "
                         f"`exclude_modules`={exclude!r} or `modules_to_save`={modules_to_save!r} leave out all of "
                         "them: no module is left to train.")
    if not chosen:
        raise ValueError(
            f"part '{part.operation}': `target_modules`={targets!r} matched no module of the model "
            f"(model_type={model_type!r}). Example module names: {[n for n, _ in candidates[:8]]}."
        )

    for name, module in chosen:
        check_supported(name, module, part.operation)  # quantized layers other than bitsandbytes
        if operation.acts_on == "linear" and not is_linear(module):
            raise ValueError(f"part '{part.operation}' needs nn.Linear or Conv1D modules, but target {name} is a "
                             f"{type(module).__name__}.")
        if output_features(module) is None:
            raise ValueError(f"part '{part.operation}': cannot tell the output size of target {name} "
                             f"({type(module).__name__}); target linear layers or norms.")
    return chosen


def _module_kind(part: APETPart, module: nn.Module) -> str:
    """The layer class a module gets: "embedding" (`PromptEmbedding`), "linear" (`Linear`) or "output"."""
    if OPERATIONS[part.operation].acts_on == "input_embedding":
        return "embedding"
    return "linear" if is_linear(module) else "output"


def _names_of(names: list[str], shown: int = 4) -> str:
    return f"{names[:shown]}" + (f" ... ({len(names)} in all)" if len(names) > shown else "")


def _in_special_set(spec: str, name: str, module: nn.Module, heads: set[str]) -> bool:
    """Whether a module belongs to "all-linear" or "all-with-bias" (output heads never do)."""
    if spec == ALL_LINEAR:
        return is_linear(module) and name not in heads
    return has_bias(module) and (is_linear(module) or isinstance(module, nn.LayerNorm)) and name not in heads


def _is_aligned(part: APETPart) -> bool:
    return OPERATIONS[part.operation].paired and part.mask is not None and part.mask_pairing == "aligned"


def _split_within_module(shapes: dict[str, tuple[int, ...]], count: int, part: APETPart) -> dict[str, int]:
    """Split a module's entries across its tensors, proportionally; for two-matrix parts (lora, adapter)
    the second, zero-initialised matrix is given at least one entry so the path can start learning, and aligned
    masks split so that both matrices' entries sit on shared units (`peft_apet.budget.split_aligned_pair`)."""
    roles = list(shapes)
    if _is_aligned(part):
        (units, first_line), (second_line, _) = shapes[roles[0]], shapes[roles[1]]
        return dict(zip(roles, split_aligned_pair(count, units, first_line, second_line, part.mask)))
    shares = allocate_budget([math.prod(shapes[r]) for r in roles], count)
    if len(roles) == 2 and count >= 2 and shares[1] == 0:
        shares = [shares[0] - 1, 1]
    if len(roles) == 2 and count >= 2 and shares[0] == 0:
        shares = [1, shares[1] - 1]
    return dict(zip(roles, shares))


def plan_adapter(model: nn.Module, config: APETConfig, adapter_name: str = "default", *, select: bool = True,
                 recorded_counts: bool = True) -> AdapterPlan:
    """Plan an adapter on `model` without modifying it; raises ValueError for bad targets or budgets.

    Args:
        model: the base model (or a model with adapters injected already: planning sees the original modules).
        config: the adapter's config.
        adapter_name: unused; kept for callers of peft-apet 0.1.
        select: choose the masks of data-free strategies (scores the base weights); False leaves every mask to its
            seed (the counts of parts without recorded counts are the same).
        recorded_counts: follow `part.mask_counts` where recorded; False plans as if no strategy had chosen masks
            yet (the per-module split by capacity that calibration ranks within).
    """
    modules_to_save = list(config.modules_to_save or [])
    modules_to_save += [m for m in TASK_HEADS.get(config.task_type, ()) if m not in modules_to_save]
    candidates = candidate_modules(model, modules_to_save)
    per_part: dict[str, list[tuple[str, nn.Module, dict[str, tuple[int, ...]]]]] = {}
    kinds: dict[str, str] = {}
    for part in config.parts:
        entries = []
        for name, module in resolve_targets(model, part, candidates, modules_to_save):
            kind = _module_kind(part, module)
            if kinds.setdefault(name, kind) != kind:
                raise ValueError(f"module {name} is targeted as {kinds[name]} and as {kind} by different parts.")
            entries.append((name, module, OPERATIONS[part.operation].shapes(part, module)))
        per_part[part.operation] = entries
    tokens = plan_trainable_tokens(model, config, modules_to_save)
    shared = [name for name in tokens if name in kinds]
    if shared:
        raise ValueError(f"`trainable_token_indices` trains rows of {shared}, which parts of the adapter also target; "
                         "a module takes token rows or parts, not both.")

    capacities = {op: sum(math.prod(s) for _, _, shapes in e for s in shapes.values()) for op, e in per_part.items()}
    fixed = {}
    for part in config.parts:
        cap = capacities[part.operation]
        owner = f"part '{part.operation}'.num_trainable_params"
        if part.mask is None:
            fixed[part.operation] = cap
        elif part.num_trainable_params is not None:
            if part.num_trainable_params > cap:
                raise ValueError(f"`{owner}` must be in [1, {cap}] (what its targets can hold), "
                                 f"got {part.num_trainable_params}.")
            fixed[part.operation] = part.num_trainable_params
        elif part.density is not None:
            fixed[part.operation] = density_to_count(part.density, cap)
    if tokens:  # whole rows: fixed entries of the exact total, like an unmasked part
        capacities[TOKENS_ROLE] = fixed[TOKENS_ROLE] = sum(t.num_entries for t in tokens.values())
    part_counts = split_config_budget(capacities, fixed, config.num_trainable_params, config.density)
    part_counts.pop(TOKENS_ROLE, None)
    part_counts = _no_lone_entry_in_aligned_parts(config, part_counts, capacities, fixed)

    modules: dict[str, ModulePlan] = {}
    for part in config.parts:
        entries = per_part[part.operation]
        recorded = part.mask_counts if recorded_counts else None
        module_counts = _module_counts(part, entries, part_counts[part.operation], recorded,
                                       pull=config.budget_split_version >= 2)
        for (name, module, shapes), count in zip(entries, module_counts):
            features = module.embedding_dim if kinds[name] == "embedding" else output_features(module) or 0
            plan = modules.setdefault(name, ModulePlan(name, kinds[name], features))
            aligned = _is_aligned(part)
            for i, (role, k) in enumerate(_split_within_module(shapes, count, part).items()):
                plan.tensors[role] = TensorPlan(
                    role=role, shape=shapes[role], mask=part.mask, axis=i if aligned else part.mask_axis,
                    num_entries=k, seed=stable_seed(config.seed, name, role), pairing="aligned" if aligned else None)
            plan.settings.update(OPERATIONS[part.operation].settings(part, module))
    plan = AdapterPlan({name: modules[name] for name, _ in candidates if name in modules}, part_counts, tokens)
    if select:
        _choose_data_free_masks(plan, model, config, recorded_counts)
    return plan


def _choose_data_free_masks(plan: AdapterPlan, model: nn.Module, config: APETConfig, recorded_counts: bool) -> None:
    """Choose the masks of parts with a data-free strategy from `model`'s weights, into `plan`. A part with recorded
    counts keeps them (each module's entries ranked within the module); the checkpoint then supplies the masks."""
    for part in config.parts:
        if data_free_score_fn(part.mask_strategy) is None:
            continue  # random, data-driven (`calibrate_masks`), or registered in the process that saved the adapter
        targets = targets_of_part(plan, model, part)
        scope = "module" if recorded_counts and part.mask_counts is not None else config.selection_scope
        chosen = choose_masks(targets, data_free_scores(part, targets), scope)
        plan.set_chosen(part.operation, [(t.name, t.tensor) for t in chosen])


def record_mask_counts(config: APETConfig, plan: AdapterPlan) -> None:
    """Write the per-module entries of every part whose masks `plan` chose into `part.mask_counts`: the config field
    that lets a saved adapter reload with the same shapes (the masks are in its checkpoint). The only writer of it."""
    for part in config.parts:
        if part.operation in plan.mask_counts:
            part.mask_counts = dict(plan.mask_counts[part.operation])


def _no_lone_entry_in_aligned_parts(config: APETConfig, counts: dict[str, int], capacities: dict[str, int],
                                    fixed: dict[str, int]) -> dict[str, int]:
    """A two-matrix part with aligned masks cannot use a single entry (no pair): refuse it as the part's own
    budget, and move it from a config-level share to the largest other share that can take it."""
    ops, values = list(counts), list(counts.values())

    def can_take(j: int) -> bool:
        return ops[j] not in fixed and 1 <= values[j] < capacities[ops[j]]

    for part in config.parts:
        op = part.operation
        if not _is_aligned(part) or values[ops.index(op)] != 1:
            continue
        if op in fixed:
            raise ValueError(
                f"part '{op}': a budget of 1 entry cannot hold a pair of aligned entries (one in each matrix); give "
                "it at least 2 (`num_trainable_params`) or set mask_pairing='independent'."
            )
        move_lone_entry(values, ops.index(op), can_take)
    return dict(zip(ops, values))


def _module_counts(part: APETPart, entries: list[tuple[str, nn.Module, dict[str, tuple[int, ...]]]],
                   total: int, recorded: dict[str, int] | None, pull: bool) -> list[int]:
    """Entries of each module of a part: split by capacity, or as a mask strategy chose them (`recorded`, the part's
    `mask_counts`). `entries`: `(name, module, shape by role)` of each targeted module; `pull`: see
    `peft_apet.budget.avoid_unpaired_counts`."""
    names = [name for name, _, _ in entries]
    capacities = [sum(math.prod(s) for s in shapes.values()) for _, _, shapes in entries]
    if recorded is None:
        counts = allocate_budget(capacities, total)
        if _is_aligned(part):  # a pair's first matrix holds one rank unit per row
            units = [next(iter(shapes.values()))[0] for _, _, shapes in entries]
            counts = avoid_unpaired_counts(counts, capacities, [c // u for c, u in zip(capacities, units)], part.mask,
                                           pull)
        return counts
    if set(recorded) != set(names) or sum(recorded.values()) != total or any(
            recorded[n] > c for n, c in zip(names, capacities)):
        raise ValueError(
            f"part '{part.operation}': `mask_counts` (per-module entries recorded when its masks were chosen, "
            f"{len(recorded)} modules, {sum(recorded.values())} entries) do not fit this model's targets "
            f"({len(names)} modules, {total} entries). They belong to an adapter fitted on another model or "
            "config; set `mask_counts=None` to choose the masks afresh."
        )
    return [recorded[n] for n in names]


def count_trainable_parameters(model: nn.Module, config: APETConfig) -> int:
    """How many parameters `config` would train on `model` (adapter entries and trainable token rows, not
    `modules_to_save`).

    The model is not modified. Use it to give an APET variant the budget of another method, e.g.
    `APETConfig.lora(mask="discrete", num_trainable_params=count_trainable_parameters(model, APETConfig.bitfit()))`.

    Args:
        model: the base model.
        config: the APET config to count.

    Returns:
        The number of trainable parameters, exactly as `print_trainable_parameters` will report them.

    Raises:
        ValueError: for every config `get_peft_model` would refuse on `model` while planning (targets, budgets,
            a data-free mask strategy that cannot score a target).
    """
    # select=True scores data-free strategies as `get_peft_model` does, so a config it refuses is refused here too
    return plan_adapter(model, config).num_trainable_params
