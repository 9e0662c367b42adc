"""Discrete masked deltas in each of their kernels (gathers, CSR, a transient dense copy) against autograd on
the written-out formula `y = x (W + W~)^T + b`, through `get_peft_model`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import OneLayer
from peft import get_peft_model

import peft_apet.functional
import peft_apet.sparse_kernels
from peft_apet import APETConfig

IN, OUT, TOKENS = 48, 40, 4  # one (40, 48) layer: 1,920 entries; the input is (2, 2, 48), 4 tokens


def _adapted(k: int, dtype: torch.dtype, adapters: int = 1, seed: int = 0, shape: tuple[int, int] = (OUT, IN)):
    torch.manual_seed(0)
    config = APETConfig.delta(target_modules=["proj"], num_trainable_params=k, init_weights=False, seed=seed)
    model = get_peft_model(OneLayer(shape[1], shape[0]).to(dtype), config)
    for i in range(1, adapters):
        model.add_adapter(f"extra{i}", APETConfig.delta(target_modules=["proj"], num_trainable_params=k,
                                                        init_weights=False, seed=i))
    layer = model.base_model.model.proj
    layer.set_adapter(list(layer.apet_weights))  # every adapter active at once
    for weights in layer.apet_weights.values():
        weights["delta"].values.data = weights["delta"].values.data.to(dtype)
    return model, layer


def _assert_matches_dense_formula(model, layer, dtype):
    """Output, input gradient and value gradients equal autograd through `x (W + W~)^T + b`."""
    out_f, in_f = layer.out_features, layer.in_features
    deltas = [w["delta"] for w in layer.apet_weights.values()]
    x = torch.randn(2, 2, in_f, dtype=dtype, requires_grad=True)
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    base = layer.get_base_layer()
    values = [d.values.detach().clone().requires_grad_(True) for d in deltas]
    x_ref = x.detach().clone().requires_grad_(True)
    dense = sum(torch.zeros(out_f * in_f, dtype=dtype).index_add(0, d.flat_indices(), v).view(out_f, in_f)
                for d, v in zip(deltas, values))
    expected = F.linear(x_ref, base.weight + dense, base.bias)
    expected.backward(grad_out)

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for d, v in zip(deltas, values):
        torch.testing.assert_close(d.values.grad, v.grad, **tol)


# A (64, 96) layer takes CSR kernels for k from 96 to 384 (density 1/16); up to 2 * (64 + 96) = 320 entries the
# products are written into strided views, above that through contiguous transposes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "strided"), [(100, True), (320, True), (350, False)])
def test_csr_products_write_strided_or_through_contiguous_copies(monkeypatch, k, strided, dtype):
    routes, choose = [], peft_apet.sparse_kernels._strided_route

    def spy(layout):
        routes.append(choose(layout))
        return routes[-1]

    monkeypatch.setattr(peft_apet.sparse_kernels, "_strided_route", spy)
    model, layer = _adapted(k, dtype, shape=(64, 96))
    _assert_matches_dense_formula(model, layer, dtype)
    assert routes == [strided, strided]  # forward (x W~^T) and backward (g W~)


# k = 20 (below the layer width 48): gathers; k = 60 or 120 (width to density 1/16, sorted): CSR; k = 500 (denser):
# W + W~ composed densely. Two adapters at once give unsorted positions: gathers while 8 * tokens * k <= 1,920
# (2 x 20), else the dense composition (2 x 60).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "adapters", "kernel"), [(20, 1, "gather"), (60, 1, "csr"), (120, 1, "csr"),
                                                        (500, 1, "dense"), (20, 2, "gather"), (60, 2, "dense")])
def test_discrete_delta_equals_dense_formula(monkeypatch, k, adapters, kernel, dtype):
    """Output, input gradient and value gradients of every kernel equal autograd through `x (W + W~)^T + b`."""
    calls = {"csr": 0, "sparse": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(peft_apet.sparse_kernels, "_csr", spy("csr", peft_apet.sparse_kernels._csr))
    monkeypatch.setattr(peft_apet.functional, "add_x_wt", spy("sparse", peft_apet.functional.add_x_wt))
    model, layer = _adapted(k, dtype, adapters)
    _assert_matches_dense_formula(model, layer, dtype)
    assert (calls["csr"] > 0, calls["sparse"] > 0) == {"gather": (False, True), "csr": (True, True),
                                                       "dense": (False, False)}[kernel]


def _formula(model, layer, x):
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()
    dense = torch.zeros(OUT * IN).index_add(0, delta.flat_indices(), delta.values.detach()).view(OUT, IN)
    return F.linear(x, base.weight + dense, base.bias)


def test_a_new_mask_is_used_after_loading_another_adapter_into_the_same_layer():
    """The kernels keep index arrays per mask: loading other positions (in place) must not reuse stale ones."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    model, layer = _adapted(200, torch.float32)
    other, _ = _adapted(200, torch.float32, seed=1)
    other_state = get_peft_model_state_dict(other)
    x = torch.randn(2, 2, IN)
    torch.testing.assert_close(model(x), _formula(model, layer, x))  # computes and keeps the first layout
    before = layer.apet_weights["default"]["delta"].flat_indices().clone()
    set_peft_model_state_dict(model, other_state)
    after = layer.apet_weights["default"]["delta"].flat_indices()
    assert not torch.equal(before, after)
    torch.testing.assert_close(model(x), _formula(model, layer, x))
