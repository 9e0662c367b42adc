"""The methods compared at equal trained entries k on an encoder classifier, shared by `benchmarks.moonshot` and
`benchmarks.training_memory`: APET's delta, PEFT LoRA at the nearest reachable count, SpaRTA at the same density,
and full fine-tuning, all on the attention and feed-forward linear layers of every encoder layer (the classifier
head trains in full in every method)."""

from __future__ import annotations

import itertools
import math
import re
import warnings

from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks import harness
from benchmarks.harness import Task
from peft_apet import APETConfig, calibrate_masks

METHODS = ("apet", "lora", "sparta", "full")
DATA_STRATEGIES = ("gradient", "fisher", "sam")  # mask strategies scored on calibration batches
CALIBRATION_BATCHES = 8  # of the training batch size (`harness.calibration_batches`, as mask_selection)
TARGET_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")


def target_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The attention and feed-forward linear layers of every encoder layer, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layer." in n and n.endswith(TARGET_KINDS)]


def lora_ranks(layers: list[tuple[str, nn.Linear]], k: int) -> dict[str, int]:
    """Per-layer LoRA ranks (layer name -> r >= 1; layers left out get no LoRA) whose count sum r * (in + out) is
    the nearest to `k` that LoRA can reach. Every layer gets rank `k // per_rank` (per_rank: the count of rank 1
    everywhere); the rest is made up by one more rank on some layers: a number of layers of each kind (query, key,
    ... share their size), found by trying every combination, ties to the fewest layers of the commonest kind, and
    spread evenly over the depth within a kind."""
    cost = {n: m.in_features + m.out_features for n, m in layers}
    base, rest = divmod(k, sum(cost.values()))
    kinds: dict[str, list[str]] = {}
    for name in cost:
        kinds.setdefault(next(kind for kind in TARGET_KINDS if name.endswith(kind)), []).append(name)
    options = [range(len(names) + 1) for names in kinds.values()]
    sizes = [cost[names[0]] for names in kinds.values()]

    def miss(counts: tuple[int, ...]) -> tuple[int, int]:
        total = sum(c * s for c, s in zip(counts, sizes))
        return abs(rest - total) if base or total else math.inf, max(counts)  # no LoRA at all is not a LoRA

    counts = min(itertools.product(*options), key=miss)
    ranks = {name: base for name in cost}
    for names, count in zip(kinds.values(), counts):
        for i in range(count):
            ranks[names[(2 * i + 1) * len(names) // (2 * count)]] += 1
    return {name: r for name, r in ranks.items() if r > 0}


def sparta(model: nn.Module, layers: list[tuple[str, nn.Linear]], k: int) -> tuple[nn.Module, list]:
    """`model` with its encoder wrapped in SpaRTA, which keeps each targeted weight entry with probability
    k / (targeted entries); the head stays outside, trained in full.

    SpaRTA trains in full only a head named `score`, and at every forward re-merges every parameter it holds, which
    would cut a head it holds out of the graph: hence the encoder alone. It freezes by substring and takes a
    sparsity over all the parameters it holds: with every other parameter frozen by its full name, keep
    probability = (1 - sparsity) * total / targeted."""
    from peft_sparta import SpaRTA

    class Encoder(SpaRTA):  # SpaRTA's train() takes no mode, as the parent's train(mode) / eval() pass it
        def train(self, mode: bool = True) -> Encoder:
            super().train() if mode else super().eval()
            return self

    prefix = model.base_model_prefix
    encoder = getattr(model, prefix)
    weights = {f"{n.removeprefix(prefix + '.')}.weight" for n, _ in layers}
    params = dict(encoder.named_parameters())
    targeted = sum(params[n].numel() for n in weights)
    wrapped = Encoder(encoder, sparsity=1 - k / sum(p.numel() for p in params.values()),
                      frozen_modules=[n for n in params if n not in weights])
    assert abs(k / targeted - wrapped.compute_keep_prob(wrapped.sparsity)) < 1e-9
    setattr(model, prefix, wrapped)
    return model, [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build(method: str, budget: int, task: Task, *, seed: int, strategy: str = "random", mask: str = "discrete",
          calibration_batch_size: int = 32) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """A fresh model with `method` (one of `METHODS`) applied at `budget` trained entries, and its trainable (name,
    parameter) pairs (`is_head` tells the head). The caller seeds torch first: the head's initialisation and
    SpaRTA's draw use the global generator. APET's delta takes `mask` ("discrete" or "adjacent"); its masks of a
    data-driven `strategy` (`DATA_STRATEGIES`) are chosen over all targeted layers at once
    (`selection_scope="global"`) from `CALIBRATION_BATCHES` training batches of `calibration_batch_size`."""
    model = harness.new_model(task)
    layers = target_layers(model)
    if method == "full":
        return model, list(model.named_parameters())
    if method == "sparta":
        return sparta(model, layers, budget)
    if method == "apet":
        scope = "module" if strategy == "random" else "global"  # as in benchmarks/MASK_SELECTION.md
        config = APETConfig.delta(mask=mask, num_trainable_params=budget, mask_strategy=strategy,
                                  selection_scope=scope, task_type="SEQ_CLS", seed=seed)
    elif method == "lora":
        ranks = lora_ranks(layers, budget)
        first = next(iter(ranks.values()))
        config = LoraConfig(r=first, lora_alpha=8, lora_dropout=0.0, target_modules=list(ranks),
                            rank_pattern={re.escape(n): r for n, r in ranks.items() if r != first},
                            task_type="SEQ_CLS")
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random placeholders until calibrate_masks"
        model = get_peft_model(model, config)
    if method == "apet" and strategy in DATA_STRATEGIES:
        calibrate_masks(model, harness.calibration_batches(task, calibration_batch_size, CALIBRATION_BATCHES,
                                                           seed))
    return model, [(n, p) for n, p in model.named_parameters() if p.requires_grad]
