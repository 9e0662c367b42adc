"""Every route of a discrete or adjacent delta against the dense formula `y = x (W + W~)^T + b`, on every device
this machine has (CPU always, CUDA when available), in fp32 and under bf16 autocast.

`benchmarks/gpu_check.sh` runs this file on a GPU machine. The routes (`peft_apet.functional`): CSR products (CPU
fp32 only; strided or through contiguous copies), gathered products, a transient `W + W~`, the side path
`add_sparse_delta` (quantized bases) and the adjacent delta's line products (whole and partial rows or columns).
Which route a case takes is asserted, per device and precision, so that a change of dispatch shows here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import OneLayer
from peft import get_peft_model

from benchmarks.speed_grid import route_counter
from peft_apet import APETConfig
from peft_apet.functional import add_sparse_delta

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OUT, IN = 64, 96  # 6,144 entries; CSR for k from 96 to 384 on CPU fp32; 4 tokens
# (k, route on CPU in fp32, route elsewhere: CUDA, or any device under autocast). Elsewhere the k-sparse product is
# gathered while 8 * tokens * k <= out * in, else W + W~ is composed; the gradient of the values is a dense
# g^T x then a gather from density 1/8 (k >= 768).
DISCRETE = [(40, "x W~^T gather", "x W~^T gather"), (100, "csr strided", "x W~^T gather"),
            (350, "csr contiguous", "dense W+W~"), (1000, "dense W+W~", "dense W+W~")]
PRECISIONS = ["fp32", "bf16"]


def _adapted(device: str, **delta):
    torch.manual_seed(0)
    config = APETConfig.delta(target_modules=["proj"], init_weights=False, **delta)
    model = get_peft_model(OneLayer(IN, OUT), config).to(device)
    return model, model.base_model.model.proj


def _autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _check(run, layer, device: str, precision: str) -> dict[str, int]:
    """Output, input gradient and value gradients of `run(x)` against autograd through the dense formula in fp32;
    returns the routes taken."""
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()
    x = torch.randn(2, 2, IN, device=device, requires_grad=True)
    with route_counter() as routes, _autocast(device, precision):
        out = run(x)
    grad_out = torch.randn(out.shape, device=device)
    with route_counter() as back:
        out.float().backward(grad_out)
    routes.update({f"backward {k}": v for k, v in back.items()})

    values = delta.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    if delta.mask == "adjacent":
        dense = _adjacent_dense(delta, values)
    else:
        dense = torch.zeros(OUT * IN, device=device).index_add(0, delta.flat_indices(), values).view(OUT, IN)
    expected = F.linear(x_ref, base.weight + dense, base.bias)
    expected.backward(grad_out)

    def close(actual, wanted):
        scale = wanted.abs().max().item()
        tol = {"rtol": 1e-4, "atol": 1e-4 * scale} if precision == "fp32" else {"rtol": 3e-2, "atol": 3e-2 * scale}
        torch.testing.assert_close(actual.float(), wanted, **tol)

    close(out, expected)
    close(x.grad, x_ref.grad)
    close(delta.values.grad, values.grad)
    return routes


def _adjacent_dense(delta, values: torch.Tensor) -> torch.Tensor:
    """`W~` `(out, in)` of an adjacent mask from `values` (differentiable): line `lines[j]` holds values in order."""
    length = IN if delta.axis == 0 else OUT
    lines = delta.index.long()
    dense = values.new_zeros(OUT, IN)
    padded = F.pad(values, (0, len(lines) * length - values.numel())).view(len(lines), length)
    if delta.axis == 0:
        return dense.index_add(0, lines, padded)
    return dense.index_add(1, lines, padded.t())


def _expected_route(device: str, precision: str, cpu_fp32: str, other: str) -> str:
    return cpu_fp32 if device == "cpu" and precision == "fp32" else other


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("k", "cpu_fp32", "other"), DISCRETE)
def test_discrete_routes_match_the_dense_formula(k, cpu_fp32, other, device, precision):
    model, layer = _adapted(device, num_trainable_params=k)
    routes = _check(model, layer, device, precision)
    route = _expected_route(device, precision, cpu_fp32, other)
    key = route if route.startswith(("x W~", "dense")) else "x W~^T csr"
    assert routes.get(key, 0) >= 1, routes
    if route.startswith("csr"):
        assert routes[route] == 1 and routes[f"backward {route}"] == 1, routes  # forward x W~^T, backward g W~
    grad = "grad dense g^T x" if k >= OUT * IN / 8 else "grad sampled csr" if route.startswith("csr") else (
        "grad gathered")
    assert routes[f"backward {grad}"] == 1, routes


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("k", "route"), [(40, "x W~^T gather"), (350, "dense W~")])
def test_side_path_of_quantized_bases_matches_the_dense_formula(k, route, device, precision):
    """`add_sparse_delta(base(x), x, deltas)`, the route of a quantized base, on a plain layer."""
    _, layer = _adapted(device, num_trainable_params=k)
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()
    routes = _check(lambda x: add_sparse_delta(base(x), x, [delta]), layer, device, precision)
    if device == "cpu" and precision == "fp32" and k == 350:
        route = "csr contiguous"
    assert routes.get(route if not route.startswith("csr") else "x W~^T csr", 0) >= 1, routes


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [IN * OUT // 96 * 2, 2 * IN + 2 * OUT + 7])  # whole lines only; lines + a partial one
def test_adjacent_routes_match_the_dense_formula(k, axis, device, precision):
    model, layer = _adapted(device, mask="adjacent", mask_axis=axis, num_trainable_params=k)
    assert _check(model, layer, device, precision) == {"adjacent": 1}
