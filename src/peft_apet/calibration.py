"""Calibration: choosing data-driven masks (`gradient`, `fisher`, `sam`) from a few batches of training data.

Gradients (`gradient`, `fisher`, `sam`). Calibration runs a bounded number of batches through the model with its
adapters disabled, in eval mode (no dropout), every parameter frozen. A forward hook on each targeted module adds
a zero vector that requires grad to its output, so the output joins the autograd graph, and reads the gradient
`G` of the loss with respect to that output in backward. With the module input `X`, example n's contribution to
the weight gradient is `G_n^T X_n` (summed over its tokens), and to the bias gradient the sum of `G_n` over tokens.
The loss is taken to be the mean over the `B` examples of a batch (as Hugging Face models compute it), so the
gradient of example n's own loss is `g_n = B · G_n^T X_n`; with token labels (causal and masked LMs, seq2seq,
token classification) Hugging Face averages over the batch's `T` labelled tokens instead, and example n's own loss
(the mean over its `T_n` tokens) has `g_n = (T / T_n) · G_n^T X_n`, so padded batches weigh every example alike.
Over the `N` calibration examples:
`g = (1/N) Σ g_n` (the gradient of the mean calibration loss) and `F = (1/N) Σ g_n ⊙ g_n` (the diagonal of the
empirical Fisher, as Sung et al.'s FISH mask). Per-example weight gradients are formed a few examples at a time
(`_CHUNK_ELEMENTS`) and squared into the running sum, never stored for the batch. Rankings do not depend on the
loss's overall scale (a summed loss scales `g` by B and `F` by B², which `sam`'s relative damping absorbs).

SAM (Fu et al., AAAI 2023, arXiv 2211.15583). Around the pre-trained weights `θ0`, the loss after a sparse update
`Δ` on a set `S` of entries is approximated by the second-order Taylor expansion with a diagonal Hessian `h`:
`L(θ0 + Δ) ≈ L(θ0) + Σ_{i∈S} (g_i Δ_i + h_i Δ_i² / 2)`. For a fixed `S` the optimum is `Δ_i = -g_i / h_i`, which
lowers the loss by `Σ_{i∈S} g_i² / (2 h_i)`; so the best `S` of size k takes the k largest `g_i² / h_i`. The exact
Hessian diagonal needs a second backward pass per entry; we use the empirical Fisher `F_i` instead: for a
negative log-likelihood loss it equals the Gauss-Newton approximation of the Hessian (`E[J^T H_out J]`) in
expectation over the model's own labels, it is non-negative (the quadratic model then always has a minimum), and
it costs one backward pass per batch, the same pass that gives `g`. Because `F_i` can be tiny where the gradient is
tiny, the Newton step `-g_i / F_i` would be huge and the quadratic model untrustworthy there; we damp it
(Levenberg-Marquardt) with `λ = damping · mean(F)` over all targeted entries of the part (relative, so it does
not depend on the loss scale; `mask_strategy_kwargs={"damping": ...}`, default 1.0). `damping → ∞` ranks by `g²`
(the `gradient` strategy); `damping = 0` ranks by `g² / F`, a per-entry signal-to-noise ratio in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .checks import check_nothing_merged
from .config import APETConfig, APETPart
from .modules import base_layer_of
from .plan import plan_adapter, record_mask_counts
from .quantized import is_bnb_quantized
from .selection import ScoredTensor, checked_scores, choose_masks, targets_of_part
from .strategies import check_mask_strategy, data_free_score_fn, is_data_driven, registered_score_fn

SAM_DAMPING = 1.0
# Elements of per-example gradients formed at once during calibration (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24

class _Statistics:
    """Running float32 sums over calibration examples of one targeted tensor: per-example gradients `Σ g_n` (what
    `.grad` would hold) and/or their squares `Σ g_n ⊙ g_n` (one running score tensor)."""

    def __init__(self, target: ScoredTensor, gradient: bool, squares: bool):
        tensors = [*target.base_layer.parameters(), *target.base_layer.buffers()]
        device = tensors[0].device if tensors else None
        shape = tuple(target.tensor.shape)
        self.grad_sum = torch.zeros(shape, device=device) if gradient else None
        self.sq_sum = torch.zeros(shape, device=device) if squares else None
        self.examples = 0

    def add(self, per_example: Callable[[slice], torch.Tensor], batch: int, batch_sum: Callable[[], torch.Tensor],
            chunk: int) -> None:
        """Add one batch: `per_example(rows)` gives a new tensor of `g_n` for a slice of examples (squared in place),
        `batch_sum()` gives `Σ_n g_n`."""
        if self.grad_sum is not None:
            self.grad_sum += batch_sum()
        if self.sq_sum is not None:
            for start in range(0, batch, chunk):
                self.sq_sum += per_example(slice(start, start + chunk)).square_().sum(0)
        self.examples += batch


class _OutputProbe:
    """Forward hook on one targeted base module: adds a zero vector that requires grad to its output (so the output
    joins the graph with every weight frozen) and, in backward, adds the batch's per-example gradients of the
    module's `delta` and/or `bias` to their statistics."""

    def __init__(self, name: str, stats: dict[str, _Statistics]):
        self.name = name
        self.stats = stats
        self.batch_size: int | None = None
        self.weights: torch.Tensor | None = None  # `(batch,)`: see `_example_weights`; None: `batch` for each
        self.calls = 0

    def start_batch(self, batch_size: int | None, weights: torch.Tensor | None) -> None:
        self.batch_size, self.weights = batch_size, weights
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"calibration: {self.name} returns a {type(output).__name__}, not a tensor.")
        self.calls += 1
        if self.calls > 1:
            raise ValueError(f"calibration: {self.name} ran twice in one forward pass (shared weights or gradient "
                             "checkpointing); per-example gradients need one call per batch. Disable gradient "
                             "checkpointing for calibration.")
        if self.batch_size is not None and output.shape[0] != self.batch_size:
            raise ValueError(f"calibration: the output of {self.name} has leading size {output.shape[0]}, not the "
                             f"batch size {self.batch_size}; per-example gradients need batch-first activations.")
        inputs = args[0].detach() if "delta" in self.stats else None
        output = output + output.new_zeros(output.shape[-1]).requires_grad_(True)
        output.register_hook(lambda grad: self._accumulate(inputs, grad))
        return output

    def _accumulate(self, inputs: torch.Tensor | None, grad: torch.Tensor) -> None:
        batch = grad.shape[0]
        # The loss is the mean over the batch: example n's own gradient is `batch` times its share (or, for a mean
        # over tokens, `_example_weights`).
        g = grad.detach().float().reshape(batch, -1, grad.shape[-1])
        g = g * (batch if self.weights is None else self.weights.to(g.device).view(-1, 1, 1))
        for role, stats in self.stats.items():
            if role == "bias":
                per_token = g.sum(1)
                stats.add(lambda rows, t=per_token: t[rows].clone(), batch, lambda t=per_token: t.sum(0), chunk=batch)
            else:
                x = inputs.float().reshape(batch, -1, inputs.shape[-1])
                chunk = max(1, _CHUNK_ELEMENTS // (g.shape[-1] * x.shape[-1]))
                stats.add(lambda rows, x=x: torch.bmm(g[rows].transpose(1, 2), x[rows]), batch,
                          lambda x=x: g.flatten(0, 1).T @ x.flatten(0, 1), chunk)


def _batch_size(batch: Any) -> int | None:
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)


def _example_weights(batch: Any, shifted: bool) -> torch.Tensor | None:
    """Per-example factors `(batch,)` that turn the gradient of the batch's loss into each example's own: None
    (`batch` each) where the loss is a mean over examples. Hugging Face models average a loss over token labels
    over the batch's `T` labelled tokens (`labels != -100`; a causal LM's `shifted` by one), so example n, with
    `T_n` of them, has its own mean-over-its-tokens loss's gradient at `T / T_n` times its share (0 where `T_n = 0`)."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point():
        return None
    counts = (labels[:, 1:] if shifted else labels).ne(-100).flatten(1).sum(1).float()
    return (counts.sum() / counts).nan_to_num(posinf=0.0) * (counts > 0)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise ValueError(f"calibration batches are {type(batch).__name__}s: pass dicts of model inputs with `labels`, "
                         "or a `loss_fn(model, batch)`.")
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: calibration batches need `labels`, or pass "
                         "`loss_fn(model, batch)` returning the mean loss over the batch.")
    return loss


def _limited(data: Iterable, max_batches: int | None) -> Iterator:
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _collect_statistics(model: nn.Module, probes: dict[str, _OutputProbe], data: Iterable, max_batches: int | None,
                        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None) -> None:
    """Run the calibration batches with adapters disabled, eval mode, every parameter frozen; restore all after
    (every module's training mode and every parameter's `requires_grad`)."""
    inner = model.base_model.model
    shifted = type(inner).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()  # labels[:, 1:] predict
    handles = [base_layer_of(inner, name).register_forward_hook(probe) for name, probe in probes.items()]
    trainable = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}  # per module: a user may keep some in eval mode
    device = next(iter(trainable)).device
    batches = 0
    try:
        model.requires_grad_(False)
        model.eval()
        for module in model.modules():
            # bitsandbytes layers have no dropout, but eval mode changes them: Linear8bitLt multiplies quantized
            # activations, and Linear4bit on CPUs with AVX512-BF16 repacks its weight for an inference kernel
            # (permanently, and without autograd). Scores must see the layers as training does.
            if is_bnb_quantized(module):
                module.training = True
        with model.disable_adapter(), torch.enable_grad():
            for batch in _limited(data, max_batches):
                batch = _to_device(batch, device)
                weights = _example_weights(batch, shifted) if loss_fn is None else None
                for probe in probes.values():
                    probe.start_batch(_batch_size(batch), weights)
                loss = loss_fn(model, batch) if loss_fn is not None else _default_loss(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError(f"the calibration loss must be a scalar tensor, got {loss!r}.")
                if not loss.requires_grad:
                    raise ValueError("the calibration loss does not depend on the targeted modules' outputs.")
                loss.backward()
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode
    if batches == 0:
        raise ValueError("calibration got no batches: the dataloader is empty.")


def _data_driven_scores(part: APETPart, stats: list[_Statistics], targets: list[ScoredTensor]) -> list[torch.Tensor]:
    """Scores from the statistics, computed in place of them (see the module docstring for the formulas)."""
    unused = [t.name for t, s in zip(targets, stats) if s.examples == 0]
    if unused:
        raise ValueError(f"part '{part.operation}': modules {unused[:5]} never ran in the calibration forward passes, "
                         "so they have no gradient to rank entries by.")
    n = stats[0].examples
    if part.mask_strategy == "gradient":
        scores = [s.grad_sum.div_(n).abs_() for s in stats]
    elif part.mask_strategy == "fisher":
        scores = [s.sq_sum.div_(n) for s in stats]
    elif part.mask_strategy != "sam":  # registered with uses_gradients=True
        score_fn, kwargs = registered_score_fn(part.mask_strategy), part.mask_strategy_kwargs or {}
        scores = []
        for t, s in zip(targets, stats):
            scores.append(score_fn(t.base_layer, t.tensor.role, tuple(t.tensor.shape), gradient=s.grad_sum.div_(n),
                                   fisher=s.sq_sum.div_(n), **kwargs))
            s.grad_sum = s.sq_sum = None
    else:
        fisher = [s.sq_sum.div_(n) for s in stats]
        damping = (part.mask_strategy_kwargs or {}).get("damping", SAM_DAMPING)
        lam = damping * sum(float(f.sum()) for f in fisher) / sum(f.numel() for f in fisher)
        scores = []
        for s, f in zip(stats, fisher):
            # g_i^2 <= F_i (Jensen), so a zero denominator (F_i = 0, damping 0) means g_i = 0: score 0, not 0/0.
            scores.append(s.grad_sum.div_(n).square_().div_(f.add_(lam)).nan_to_num_(nan=0.0))
            s.grad_sum = s.sq_sum = None
    scores = [checked_scores(s, t, part.mask_strategy) for s, t in zip(scores, targets)]
    if all(float(s.max()) == float(s.min()) == float(scores[0].max()) for s in scores):
        raise ValueError(f"part '{part.operation}': mask_strategy={part.mask_strategy!r} gives every entry the same "
                         "score from these calibration batches, so it cannot rank them (is the loss constant in "
                         "these modules?).")
    return scores


def _adapter_config(model: nn.Module, adapter_name: str | None) -> tuple[APETConfig, str]:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(f"calibrate_masks needs a PeftModel with an APET adapter (from get_peft_model), got "
                         f"{type(model).__name__}.")
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, APETConfig):
        raise ValueError(f"adapter {adapter_name!r} is not an APET adapter (its config is {type(config).__name__}).")
    return config, adapter_name


def calibrate_masks(
    model: nn.Module,
    data: Iterable | Any = None,
    max_batches: int | None = 8,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> nn.Module:
    """Choose the masks of every part of an APET adapter that has a non-random `mask_strategy`, in place.

    Args:
        model: a `PeftModel` with an APET adapter (the active one, or `adapter_name`).
        data: calibration batches: an iterable (e.g. a `DataLoader`) of dicts of model inputs with `labels`, or a
            `transformers.Trainer` (its training dataloader is used). Only needed by data-driven strategies
            (`gradient`, `fisher`, `sam`); data-free ones (`magnitude`, registered) are recomputed without it.
        max_batches: at most this many batches are used (None: all of `data`).
        loss_fn: `loss_fn(model, batch) -> scalar` for batches the model does not compute a loss for; it must be
            the mean over the batch's examples (per-example gradients are read as batch size x share).
        adapter_name: the APET adapter to calibrate (default: the active adapter).

    Scores are taken at the pre-trained model (adapters disabled), in eval mode, deterministically for a fixed
    model and data order. Each part keeps its exact budget: per module, or across modules with
    `config.selection_scope == "global"`. The chosen masks replace the part's index buffers, its values are reset to
    their initial values, and the per-module counts are written to `part.mask_counts` of the adapter's config,
    `model.peft_config[adapter_name]` (saved with the adapter, so `PeftModel.from_pretrained` reloads it without
    calibrating; the config object given to `get_peft_model` is not changed). Every adapter must be unmerged
    (ValueError otherwise, before anything changes). Returns `model`.
    """
    config, adapter_name = _adapter_config(model, adapter_name)
    check_nothing_merged(model, "calibrate_masks")
    scored = [p for p in config.parts if p.mask_strategy != "random"]
    if not scored:
        raise ValueError(f"APET adapter {adapter_name!r} has no part with a mask_strategy to calibrate (all parts are "
                         "'random'); set e.g. APETConfig.delta(..., mask_strategy='sam').")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}.")
    needs_data = [p for p in scored if is_data_driven(p.mask_strategy)]
    if needs_data and data is None:
        raise ValueError(f"parts {[p.operation for p in needs_data]} use data-driven mask strategies "
                         f"{sorted({p.mask_strategy for p in needs_data})}: pass calibration batches, "
                         "calibrate_masks(model, dataloader).")
    if hasattr(data, "get_train_dataloader"):  # a transformers.Trainer
        data = data.get_train_dataloader()
    for p in scored:
        if not is_data_driven(p.mask_strategy) and data_free_score_fn(p.mask_strategy) is None:
            check_mask_strategy(p.mask_strategy, {}, f"part '{p.operation}'")  # raises: not registered here

    inner = model.base_model.model
    # The split every part would get before any counts were recorded; data-free parts get their masks here.
    plan = plan_adapter(inner, config, recorded_counts=False)
    targets = {p.operation: targets_of_part(plan, inner, p) for p in scored}

    stats: dict[str, list[_Statistics]] = {}
    probes: dict[str, _OutputProbe] = {}
    for part in needs_data:
        needs_sum, needs_squares = part.mask_strategy != "fisher", part.mask_strategy != "gradient"
        stats[part.operation] = [_Statistics(t, needs_sum, needs_squares) for t in targets[part.operation]]
        for t, s in zip(targets[part.operation], stats[part.operation]):
            probes.setdefault(t.name, _OutputProbe(t.name, {})).stats[part.operation] = s
    if probes:
        _collect_statistics(model, probes, data, max_batches, loss_fn)

    for part in needs_data:
        part_targets = targets[part.operation]
        scores = _data_driven_scores(part, stats.pop(part.operation), part_targets)
        chosen = choose_masks(part_targets, scores, config.selection_scope)
        del scores
        plan.set_chosen(part.operation, [(t.name, t.tensor) for t in chosen])
    model.base_model.replace_masks(adapter_name, [(t.name, plan.modules[t.name].tensors[t.tensor.role])
                                                  for p in scored for t in targets[p.operation]])
    record_mask_counts(config, plan)
    return model
