"""Every route of a discrete or adjacent delta against the dense formula `y = x (W + W~)^T + b`, on every device
this machine has (CPU always, CUDA when available), in fp32 and under bf16 autocast.

`benchmarks/gpu_check.sh` runs this file on a GPU machine. The routes (`peft_apet.routes`): CSR products (CPU fp32
only; strided or through contiguous copies), gathered products, a transient `W + W~`, `W` patched in place for its
matmul (or, on the side path `add_sparse_delta` of quantized bases, a transient `W~` and its matmul), and value
gradients by gathers, sampled CSR (CPU only) or a dense `g^T x`; and the adjacent delta's line products (whole and
partial rows or columns). Each case runs the route the cost model picks (asserted, per device and precision, so that
a change of dispatch shows here) and then every route available on that device and precision, forced.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import OneLayer
from peft import get_peft_model

from benchmarks.speed_grid import route_counter
from peft_apet import APETConfig, routes
from peft_apet.functional import add_sparse_delta, dequantized_delta_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OUT, IN, TOKENS = 64, 96, 4  # 6,144 entries; the input is (2, 2, 96)
DISCRETE = [40, 100, 350, 1000]  # k: below the width, two between width and density 1/16, above
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
    with route_counter() as taken, _autocast(device, precision):
        out = run(x)
    grad_out = torch.randn(out.shape, device=device)
    out.float().backward(grad_out)

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
    delta.values.grad = None
    return taken


def _adjacent_dense(delta, values: torch.Tensor) -> torch.Tensor:
    """`W~` `(out, in)` of an adjacent mask from `values` (differentiable): line `lines[j]` holds values in order."""
    length = IN if delta.axis == 0 else OUT
    lines = delta.index.long()
    dense = values.new_zeros(OUT, IN)
    padded = F.pad(values, (0, len(lines) * length - values.numel())).view(len(lines), length)
    if delta.axis == 0:
        return dense.index_add(0, lines, padded)
    return dense.index_add(1, lines, padded.t())


def _case(device: str, precision: str, k: int, side: bool) -> routes.Case:
    return routes.case_of(OUT, IN, TOKENS, k, dtype=torch.float32, device=device, autocast=precision == "bf16",
                          strictly_sorted=True, side=side, patchable=True)  # a training step


def _counted(chosen: routes.Routes) -> dict[str, int]:
    return {f"{what} {getattr(chosen, what)}": 1 for what in ("forward", "grad_x", "values")}


def _every_route(run, layer, device: str, precision: str, case: routes.Case) -> None:
    """The chosen routes, then each available route forced (as forward, as input gradient and as value gradient)."""
    assert _check(run, layer, device, precision) == _counted(routes.choose(case))
    products, values = routes.available(case)
    for i in range(max(len(products), len(values))):
        forced = routes.Routes(products[i % len(products)], products[(i + 1) % len(products)], values[i % len(values)])
        with routes.forced(**forced.__dict__):
            assert _check(run, layer, device, precision) == _counted(forced)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", DISCRETE)
def test_discrete_routes_match_the_dense_formula(k, device, precision):
    model, layer = _adapted(device, num_trainable_params=k)
    _every_route(model, layer, device, precision, _case(device, precision, k, side=False))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", DISCRETE)
def test_side_path_of_quantized_bases_matches_the_dense_formula(k, device, precision):
    """`add_sparse_delta(base(x), x, deltas)`, the route of a quantized base, on a plain layer."""
    _, layer = _adapted(device, num_trainable_params=k)
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()
    _every_route(lambda x: add_sparse_delta(base(x), x, [delta]), layer, device, precision,
                 _case(device, precision, k, side=True))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", DISCRETE)
def test_delta_on_the_dequantized_weight_matches_the_dense_formula(k, device, precision):
    """`dequantized_delta_linear`, the route of 4-bit bases for several tokens (`W` read through a callable that
    returns a new copy, as dequantization does), on a plain layer; with each value-gradient route."""
    _, layer = _adapted(device, num_trainable_params=k)
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()

    def run(x):
        return dequantized_delta_linear(x, lambda: base.weight.detach().clone(), base.bias, [delta])

    _check(run, layer, device, precision)
    for route in routes.available(_case(device, precision, k, side=False))[1]:
        with routes.forced(values=route):
            _check(run, layer, device, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [IN * OUT // 96 * 2, 2 * IN + 2 * OUT + 7])  # whole lines only; lines + a partial one
def test_adjacent_routes_match_the_dense_formula(k, axis, device, precision):
    model, layer = _adapted(device, mask="adjacent", mask_axis=axis, num_trainable_params=k)
    assert _check(model, layer, device, precision) == {"adjacent": 1}
