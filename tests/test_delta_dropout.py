"""`delta_dropout` on delta and bias parts: in training, `y = x (W + d ⊙ W~)^T + (b + d_b ⊙ b~)` with `d` inverted
dropout masks on the trainable entries (as SpaRTA); in eval, merge and on disk nothing changes.

The reference draws its masks as `F.dropout(torch.ones(k), p)` after the same `torch.manual_seed` as the forward pass
(one draw per delta, in the order the layer runs: folded deltas, then the adjacent one, then the bias)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import OneLayer
from peft import PeftModel, get_peft_model

from peft_apet import APETConfig, APETPart

IN, OUT = 48, 40  # one (40, 48) layer


def _adapted(*configs: APETConfig):
    """A `OneLayer` with one adapter per config, all active; returns the model and its APET layer."""
    torch.manual_seed(0)
    model = get_peft_model(OneLayer(IN, OUT), configs[0])
    for i, config in enumerate(configs[1:], 1):
        model.add_adapter(f"extra{i}", config)
    layer = model.base_model.model.proj
    layer.set_adapter(list(layer.apet_weights))
    return model, layer


def _delta(p: float = 0.0, **kwargs) -> APETConfig:
    return APETConfig.delta(target_modules=["proj"], init_weights=False, delta_dropout=p, **kwargs)


def _bias(p: float = 0.0, **kwargs) -> APETConfig:
    return APETConfig.bitfit(target_modules=["proj"], init_weights=False, delta_dropout=p, **kwargs)


def _dense(weight, values: torch.Tensor) -> torch.Tensor:
    """`values` placed at the positions of `weight`'s mask, in a tensor of its shape (the reference's own scatter)."""
    numel = weight.shape[0] * (weight.shape[1] if len(weight.shape) == 2 else 1)
    return torch.zeros(numel).index_add(0, weight.flat_indices(), values).view(weight.shape)


def _check_against_formula(model, layer, draws: list[tuple[str, str, float]]):
    """Train-mode output, input gradient and value gradients equal autograd through the written-out formula, with
    the same dropout draws; `draws`: (adapter, role, p) in the order the layer draws them. Dropped entries get no
    gradient."""
    x = torch.randn(2, 3, IN, requires_grad=True)
    model.train()
    torch.manual_seed(7)
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    torch.manual_seed(7)
    keep = [F.dropout(torch.ones(layer.apet_weights[a][r].num_entries), p) for a, r, p in draws]
    base = layer.get_base_layer()
    x_ref = x.detach().clone().requires_grad_(True)
    values = [layer.apet_weights[a][r].values.detach().clone().requires_grad_(True) for a, r, _ in draws]
    weight, bias = base.weight.detach(), base.bias.detach()
    for (a, r, _), d, v in zip(draws, keep, values):
        changed = _dense(layer.apet_weights[a][r], d * v)
        weight, bias = (weight + changed, bias) if r == "delta" else (weight, bias + changed)
    expected = F.linear(x_ref, weight, bias)
    expected.backward(grad_out)

    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (a, r, p), d, v in zip(draws, keep, values):
        grad = layer.apet_weights[a][r].values.grad
        torch.testing.assert_close(grad, v.grad, rtol=1e-5, atol=1e-5)
        assert torch.all(grad[d == 0] == 0) and (p == 0 or bool((d == 0).any()))


# k = 20: gathers; 60: CSR kernels; 500: W + W~ composed densely (see test_functional); mask=None: every entry.
@pytest.mark.parametrize("mask,k", [("discrete", 20), ("discrete", 60), ("discrete", 500), (None, None)])
def test_discrete_and_unmasked_deltas_follow_the_formula(mask, k):
    model, layer = _adapted(_delta(0.3, mask=mask, num_trainable_params=k))
    _check_against_formula(model, layer, [("default", "delta", 0.3)])


@pytest.mark.parametrize("axis", [0, 1])
def test_adjacent_deltas_follow_the_formula(axis):
    model, layer = _adapted(_delta(0.5, mask="adjacent", mask_axis=axis, num_trainable_params=130))
    _check_against_formula(model, layer, [("default", "delta", 0.5)])


@pytest.mark.parametrize("mask,k", [("discrete", 15), (None, None)])
def test_bias_follows_the_formula(mask, k):
    model, layer = _adapted(_bias(0.3, mask=mask, num_trainable_params=k))
    _check_against_formula(model, layer, [("default", "bias", 0.3)])


def test_several_deltas_draw_their_own_masks():
    """Two adapters' discrete deltas share one product (each with its own p), then a bias of the same adapter."""
    combined = APETConfig.combine(_delta(0.2, num_trainable_params=30), _bias(0.6), init_weights=False)
    model, layer = _adapted(combined, _delta(0.4, num_trainable_params=25, seed=3))
    _check_against_formula(model, layer, [("default", "delta", 0.2), ("extra1", "delta", 0.4),
                                          ("default", "bias", 0.6)])


CASES = {
    "discrete": lambda p: _delta(p, num_trainable_params=60),
    "adjacent": lambda p: _delta(p, mask="adjacent", num_trainable_params=100),
    "unmasked": lambda p: _delta(p, mask=None),
    "bias": lambda p: _bias(p, mask="discrete", num_trainable_params=10),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_equals_the_model_without_dropout_bit_for_bit(case):
    x = torch.randn(2, 3, IN)
    plain, _ = _adapted(CASES[case](0.0))
    dropped, _ = _adapted(CASES[case](0.5))
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), plain.eval()(x))
        plain.train()
        assert torch.equal(plain(x), plain.eval()(x))  # p = 0 in training: no dropout either


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unmerge_ignore_dropout(case):
    x = torch.randn(2, 3, IN)
    plain, plain_layer = _adapted(CASES[case](0.0))
    dropped, layer = _adapted(CASES[case](0.5))
    dropped.train()
    before = [t.clone() for t in layer.get_base_layer().parameters()]
    assert torch.equal(layer.get_delta_weight("default"), plain_layer.get_delta_weight("default"))
    for model in (plain, dropped):
        model.merge_adapter()
    assert all(torch.equal(a, b) for a, b in zip(layer.get_base_layer().parameters(),
                                                  plain_layer.get_base_layer().parameters()))
    with torch.no_grad():
        assert torch.equal(dropped(x), dropped(x))  # merged: the base layer alone, no draw
    for model in (plain, dropped):
        model.unmerge_adapter()
    for a, b, c in zip(layer.get_base_layer().parameters(), plain_layer.get_base_layer().parameters(), before):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)  # (W + W~) - W~ rounds


def test_saved_adapter_reloads_with_its_dropout(tmp_path):
    model, layer = _adapted(APETConfig.combine(_delta(0.25, num_trainable_params=40), _bias(0.5),
                                               init_weights=False))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["parts"]
    assert [p["delta_dropout"] for p in saved] == [0.25, 0.5]
    torch.manual_seed(0)  # the base weights of `_adapted`
    loaded = PeftModel.from_pretrained(OneLayer(IN, OUT), tmp_path)
    assert [p.delta_dropout for p in loaded.peft_config["default"].parts] == [0.25, 0.5]
    x = torch.randn(2, 3, IN)
    outputs = []
    for m in (model, loaded):
        m.train()
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(m(x))
    assert torch.equal(*outputs)


def test_delta_dropout_is_written_only_when_set():
    """Configs that do not set it keep 0.1's bytes; a set value comes after every 0.1 field and reads back."""
    for config in (_delta(), _delta(0), _bias(), APETConfig.lora()):
        assert "delta_dropout" not in config.to_dict()["parts"][0]
    part = _bias(0.1).to_dict()["parts"][0]
    assert list(part)[-1] == "delta_dropout" and part["delta_dropout"] == 0.1
    assert APETPart(**part).delta_dropout == 0.1
    assert APETPart(**{**part, "delta_dropout": 0.0}) == _bias().parts[0]
    assert type(_delta(0).parts[0].delta_dropout) is float


@pytest.mark.parametrize("make,message", [
    (lambda: _delta(1.0), r"part 'delta': `delta_dropout` must be a float in \[0, 1\), got 1.0"),
    (lambda: _bias(-0.5), r"part 'bias': `delta_dropout` must be a float in \[0, 1\), got -0.5"),
    (lambda: _delta("0.1"), r"`delta_dropout` must be a float in \[0, 1\), got '0.1'"),
    (lambda: APETPart(operation="lora", delta_dropout=0.1),
     r"part 'lora': `delta_dropout` is only used by operations \['bias', 'delta'\] \(got delta_dropout=0.1\)"),
    (lambda: APETConfig(parts=[{"operation": "adapter", "delta_dropout": 0.2}]), r"`delta_dropout` is only used by"),
])
def test_bad_values_and_other_parts_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bnb_4bit_side_path_follows_the_formula(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=96)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    model = get_peft_model(base, APETConfig.delta(num_trainable_params=300, target_modules=["q_proj"],
                                                  init_weights=False, delta_dropout=0.4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.apet_weights["default"]["delta"]
    x = torch.randn(3, 64)
    layer.train()
    torch.manual_seed(5)
    out = layer(x)
    out.sum().backward()
    torch.manual_seed(5)
    keep = F.dropout(torch.ones(delta.num_entries), 0.4)
    values = delta.values.detach().clone().requires_grad_(True)
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
    expected = base_out + x @ torch.zeros(64 * 64).index_add(0, delta.flat_indices(), keep * values).view(64, 64).T
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.values.grad, values.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(delta.values.grad[keep == 0] == 0) and bool((keep == 0).any())
    layer.eval()  # (bitsandbytes may repack the weight for its eval kernel: take the base output again)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + x @ delta.dense().T, rtol=1e-5, atol=1e-5)
