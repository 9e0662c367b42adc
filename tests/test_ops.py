"""Discrete masked deltas in each of their kernels (gathers, CSR, a transient dense copy) against autograd on
the written-out formula `y = x (W + W~)^T + b`, through `get_peft_model`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import peft_apet.ops
from peft_apet import APETConfig

IN, OUT, TOKENS = 48, 40, 4  # one (40, 48) layer: 1,920 entries; the input is (2, 2, 48), 4 tokens


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _adapted(k: int, dtype: torch.dtype, adapters: int = 1):
    torch.manual_seed(0)
    model = get_peft_model(OneLayer().to(dtype), APETConfig.delta(target_modules=["proj"], num_trainable_params=k,
                                                                  init_weights=False, seed=0))
    for i in range(1, adapters):
        model.add_adapter(f"extra{i}", APETConfig.delta(target_modules=["proj"], num_trainable_params=k,
                                                        init_weights=False, seed=i))
    layer = model.base_model.model.proj
    layer.set_adapter(list(layer.apet_weights))  # every adapter active at once
    for weights in layer.apet_weights.values():
        weights["delta"].values.data = weights["delta"].values.data.to(dtype)
    return model, layer


# k = 20: gathers (k below the layer width); k = 60: CSR (k >= width, 8 * tokens * k <= 1,920);
# k = 500: W + W~ composed densely (8 * tokens * k > 1,920). Two adapters of 60: unsorted positions, gathers.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "adapters", "uses_csr"), [(20, 1, False), (60, 1, True), (500, 1, False),
                                                          (60, 2, False)])
def test_discrete_delta_equals_dense_formula(monkeypatch, k, adapters, uses_csr, dtype):
    calls = []
    original = peft_apet.ops._csr
    monkeypatch.setattr(peft_apet.ops, "_csr", lambda *a: calls.append(1) or original(*a))
    model, layer = _adapted(k, dtype, adapters)
    deltas = [w["delta"] for w in layer.apet_weights.values()]
    x = torch.randn(2, 2, IN, dtype=dtype, requires_grad=True)
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    base = layer.get_base_layer()
    values = [d.values.detach().clone().requires_grad_(True) for d in deltas]
    x_ref = x.detach().clone().requires_grad_(True)
    dense = sum(torch.zeros(OUT * IN, dtype=dtype).index_add(0, d.flat_indices(), v).view(OUT, IN)
                for d, v in zip(deltas, values))
    expected = F.linear(x_ref, base.weight + dense, base.bias)
    expected.backward(grad_out)

    assert bool(calls) == uses_csr
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for d, v in zip(deltas, values):
        torch.testing.assert_close(d.values.grad, v.grad, **tol)
