"""Trainable token rows (`APETConfig.trainable_token_indices`): new or re-trained tokens, as PEFT's LoRA offers.

Chat fine-tuning adds special tokens whose embedding rows must train while the rest of the embedding stays frozen.
APET reuses PEFT's own mechanism for this: an `APETConfig` with `trainable_token_indices` set makes PEFT's
`BaseTuner.inject_adapter` wrap the embedding in a `TrainableTokensWrapper` (exactly as for a `LoraConfig`), which

- trains one `(len(ids), dim)` tensor of the chosen rows (`token_adapter.trainable_tokens_delta`; it holds the rows
  themselves, initialised from the embedding, not differences),
- saves only those rows (the ids are in `adapter_config.json`),
- merges by writing the rows into the embedding (`merge_and_unload`), and
- with tied input/output embeddings (GPT-2, T5) ties the output layer to the same rows (one tensor, counted once).

This module plans those rows before PEFT touches the model, so that `count_trainable_parameters`, the config-level
budget (`num_trainable_params` is the exact total including the rows), `adapter_summary()` and the checkpoint checks
see them, and so that bad ids or targets fail with a `ValueError` before any module is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, TrainableTokensWrapper, _get_input_embeddings_name
from torch import nn

from .config import APETConfig

TOKENS_ROLE = "tokens"
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's checkpoint key of the rows, after the module name


@dataclass(frozen=True)
class TokenPlan:
    """The trainable rows of one embedding (or output) layer.

    Attributes:
        name: the module's name in the model (the one PEFT wraps and saves the rows under).
        token_ids: the trained rows (token ids), in the order they are stored.
        dim: length of a row (the embedding dimension; `in_features` of a linear output layer).
    """

    name: str
    token_ids: tuple[int, ...]
    dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.token_ids), self.dim)

    @property
    def num_entries(self) -> int:
        return len(self.token_ids) * self.dim


def _base_of(module: nn.Module) -> nn.Module:
    if isinstance(module, TrainableTokensWrapper):
        return module.token_adapter.get_base_layer()
    return module


def _output_embedding(model: nn.Module) -> nn.Module | None:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return _base_of(head) if head is not None else None


def _rows_and_dim(name: str, module: nn.Module, output_embedding: nn.Module | None) -> tuple[int, int]:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    # PEFT's token layer computes `x W^T` without a bias: only a bias-free output embedding (LM head) qualifies
    if isinstance(module, nn.Linear) and module is output_embedding and module.bias is None:
        return module.out_features, module.in_features
    if isinstance(module, BaseTunerLayer):
        raise ValueError(f"`trainable_token_indices`: module {name} already carries another adapter "
                         f"({type(module).__name__}); token rows and adapter parts cannot share a module.")
    raise ValueError(f"`trainable_token_indices`: module {name} is a {type(module).__name__}; token rows train "
                     "rows of an nn.Embedding or of the model's bias-free output embedding (LM head).")


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of every module, with duplicates (tied modules appear under each name, as PEFT matches them),
    seeing through PEFT's token wrappers and skipping the insides of other wrappers and tuner layers."""
    out, skip = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, (AuxiliaryTrainingWrapper, BaseTunerLayer)):
            skip.append(name + ".")
        out.append((name, _base_of(module)))
    return out


def plan_trainable_tokens(model: nn.Module, config: APETConfig, modules_to_save: list[str]) -> dict[str, TokenPlan]:
    """The rows `config.trainable_token_indices` trains on `model`, by owning module; the model is not changed.

    Matches module names as PEFT does (`name.endswith(key)`). Modules that share one weight tensor (tied input and
    output embeddings) share one set of rows, owned by the first of them; giving them different ids is refused.

    Args:
        model: the base model (or a model that already has APET adapters).
        config: the adapter's config.
        modules_to_save: modules trained in full (a module cannot be both).

    Raises:
        ValueError: a target matches no module or a module of another kind, an id is out of range, a module is also
            in `modules_to_save`, or tied modules are given different ids.
    """
    indices = config.trainable_token_indices
    if indices is None:
        return {}
    if isinstance(indices, dict):
        targets = dict(indices)
    else:
        name = _get_input_embeddings_name(model, None)
        if name is None:
            raise ValueError("`trainable_token_indices` as a list trains rows of the input embedding, but the model "
                             "exposes none (`get_input_embeddings()`); give a dict {module name: ids}.")
        targets = {name: indices}
    clash = [key for key in targets if key in modules_to_save]
    if clash:
        raise ValueError(f"`trainable_token_indices` targets {clash}, which `modules_to_save` trains in full; give "
                         "each module to one of them.")
    modules = _named_modules(model)
    output_embedding = _output_embedding(model)
    by_name = dict(modules)
    owners: dict[int, TokenPlan] = {}  # id(weight) -> rows; tied modules share one weight
    for key, ids in targets.items():
        matched = [(name, module) for name, module in modules if name.endswith(key)]
        if not matched:
            raise ValueError(f"`trainable_token_indices`: {key!r} matches no module of the model (PEFT matches name "
                             f"suffixes). Embedding layers: {[n for n, m in modules if isinstance(m, nn.Embedding)]}.")
        for name, module in matched:
            rows, dim = _rows_and_dim(name, module, output_embedding)
            if max(ids) >= rows:
                raise ValueError(f"`trainable_token_indices`: id {max(ids)} is out of range for {name}, which has "
                                 f"{rows} rows (resize the embedding first, e.g. `model.resize_token_embeddings`).")
            plan = owners.setdefault(id(module.weight), TokenPlan(name, tuple(ids), dim))
            owner = by_name[plan.name]
            if plan.name != name and output_embedding not in (module, owner):
                input_name = _get_input_embeddings_name(model, None)
                raise ValueError(
                    f"`trainable_token_indices`: {plan.name} and {name} share one weight, but PEFT would train "
                    "separate rows for each (two diverging copies of one tied weight; only an output embedding is "
                    f"tied to the input embedding's rows). Give the module that owns the weight instead"
                    + (f", e.g. {{{input_name!r}: ids}} or a list of ids." if input_name else "."))
            if plan.token_ids != tuple(ids):
                raise ValueError(f"`trainable_token_indices` gives {plan.name} and {name} different ids, but they "
                                 "share one weight (tied embeddings): give both the same ids, or only the input "
                                 "embedding (PEFT then ties the output layer to its rows).")
    return {plan.name: plan for plan in owners.values()}


def token_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, TrainableTokensLayer]]:
    """`(name of the wrapped module, token layer)` of every untied token layer holding rows of `adapter_name`."""
    return [(name, module.token_adapter) for name, module in model.named_modules()
            if isinstance(module, TrainableTokensWrapper) and module.token_adapter.tied_adapter is None
            and adapter_name in module.token_adapter.trainable_tokens_delta]


def check_token_rows_match_other_adapters(model: nn.Module, new_adapter: str, new_rows: dict[str, TokenPlan],
                                          other_adapters: list[str]) -> None:
    """Refuse an adapter whose token rows are on other modules than those of the model's other adapters.

    PEFT's token wrappers are per module, and saving reads every wrapper for every adapter, so an adapter without
    rows in a wrapper another adapter made cannot be saved (`KeyError` in `get_peft_model_state_dict`, for PEFT's
    LoRA too): found after training, that would lose the run. Raised before the model changes."""
    if not other_adapters:
        return
    wrapped = sorted({name for adapter in other_adapters for name, _ in token_layers(model, adapter)})
    if sorted(new_rows) != wrapped:
        raise ValueError(
            f"adapter {new_adapter!r} trains token rows (`trainable_token_indices`) of {sorted(new_rows)}, and the "
            f"model's other adapters {other_adapters} of {wrapped}. PEFT cannot save adapters of one model whose "
            "token rows are on different modules (a KeyError at save_pretrained). Give every adapter of the model "
            "rows on the same modules (the ids may differ), or put this adapter on its own copy of the base model."
        )
