"""Every route of a discrete delta (forced through `routes.forced`) against the dense formula `y = x (W + W~)^T + b`,
and the chooser: deterministic, the model's cheapest available route, and its constants those of the calibration.

Routes run through `functional`'s autograd functions on `SparseLayout`s directly, so that edge cases a config
cannot ask for (k = 0, k = out * in, repeated positions of several adapters) are covered too."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peft_apet import routes
from peft_apet.functional import _AddSparseDelta, _DiscreteDeltaLinear
from peft_apet.masks import discrete_mask
from peft_apet.sparse_kernels import SparseLayout

# (out, in, tokens, k): k = 0, 1, the layer's width, densities up to 1, a single token, more tokens than entries
SHAPES = [(40, 48, 4, 0), (40, 48, 4, 1), (40, 48, 4, 48), (40, 48, 4, 300), (40, 48, 4, 1920), (64, 96, 7, 700),
          (16, 8, 33, 100), (24, 32, 1, 50)]
PRECISIONS = ["fp32", "fp64", "bf16"]  # bf16: fp32 weights and activations under bf16 autocast


def _layout(out_f: int, in_f: int, k: int, unsorted: bool) -> SparseLayout:
    """A sorted mask of k entries, or (unsorted) two adapters' masks of k // 2 and k - k // 2 entries one after the
    other, as `functional._joint_layout` builds them: repeated positions are possible."""
    if not unsorted:
        return SparseLayout(discrete_mask((out_f, in_f), k, seed=1).long(), (out_f, in_f))
    parts = [discrete_mask((out_f, in_f), n, seed=s).long() for n, s in ((k // 2, 2), (k - k // 2, 3))]
    return SparseLayout(torch.cat(parts), (out_f, in_f))


def _run(layout: SparseLayout, tokens: int, precision: str, side: bool, force: dict[str, str]):
    """Output, input gradient and value gradients of one route against autograd through the dense formula (in
    fp64), with tolerances of the precision."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    out_f, in_f = layout.shape
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(out_f, in_f, generator=gen, dtype=dtype), torch.randn(out_f, generator=gen, dtype=dtype)
    values = torch.randn(layout.flat.numel(), generator=gen, dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, in_f, generator=gen, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, out_f, generator=gen, dtype=dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with routes.forced(**force), autocast:
        if side:
            out = _AddSparseDelta.apply(F.linear(x, weight, bias).clone(), x, layout, values)
        else:
            out = _DiscreteDeltaLinear.apply(x, weight, bias, layout, values, True)
    out.to(dtype).backward(grad_out)

    values_ref = values.detach().double().requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    dense = torch.zeros(out_f * in_f, dtype=torch.float64).index_add(0, layout.flat, values_ref).view(out_f, in_f)
    expected = F.linear(x_ref, weight.double() + dense, bias.double())
    expected.backward(grad_out.double())
    rel = {"fp32": 1e-5, "fp64": 1e-10, "bf16": 3e-2}[precision]
    for actual, wanted in ((out, expected), (x.grad, x_ref.grad), (values.grad, values_ref.grad)):
        scale = wanted.abs().max().item() if wanted.numel() else 1.0
        torch.testing.assert_close(actual.double(), wanted, rtol=rel, atol=rel * scale)


def _case(layout: SparseLayout, tokens: int, precision: str, side: bool) -> routes.Case:
    dtype = torch.float64 if precision == "fp64" else torch.float32
    k = layout.flat.numel()
    return routes.case_of(*layout.shape, tokens, k, dtype=dtype, device="cpu", autocast=precision == "bf16",
                          strictly_sorted=k > 0 and layout.strictly_sorted, side=side, patchable=True)


@pytest.mark.parametrize("side", [False, True], ids=["linear", "side path"])
@pytest.mark.parametrize("unsorted", [False, True], ids=["sorted", "two adapters"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_route_equals_the_dense_formula(precision, unsorted, side):
    """Each available product route as forward and as input gradient, and each value-gradient route, on every
    shape: the forced route runs (checked through the chooser) and matches the formula."""
    ran = set()
    for out_f, in_f, tokens, k in SHAPES:
        if unsorted and k < 2:
            continue
        layout = _layout(out_f, in_f, k, unsorted)
        products, values = routes.available(_case(layout, tokens, precision, side))
        for i, route in enumerate(products):
            other = products[(i + 1) % len(products)]  # forward and input gradient on different routes too
            _run(layout, tokens, precision, side, {"forward": route, "grad_x": other})
            ran |= {("product", route), ("product", other)}
        for route in values:
            _run(layout, tokens, precision, side, {"values": route})
            ran.add(("values", route))
    csr = not unsorted and precision != "bf16"
    expected = {("product", r) for r in (("gather", "dense_delta") if side else ("gather", "composed", "patched"))} | {
        ("product", r) for r in ("csr_strided", "csr_contiguous") if csr} | {
        ("values", r) for r in ("gather", "dense")} | ({("values", "sampled_csr")} if not unsorted else set())
    assert ran == expected


def test_a_forced_route_that_does_not_apply_is_refused():
    layout = _layout(40, 48, 300, unsorted=True)
    with pytest.raises(ValueError, match="not all available"):
        _run(layout, 4, "fp32", False, {"forward": "csr_strided"})
    with pytest.raises(ValueError, match="not all available"):
        _run(_layout(40, 48, 300, unsorted=False), 4, "fp32", False, {"forward": "dense_delta"})


CHOOSER_CASES = [routes.Case(o, i, t, max(1, round(d * o * i)), csr, csr, side, patch)
                 for o, i in ((768, 768), (3072, 768), (128, 896), (40, 48)) for t in (1, 64, 512, 8192)
                 for d in (1e-4, 1e-3, 1 / 64, 1 / 8, 1) for csr in (False, True) for side in (False, True)
                 for patch in (False, True)]


def test_the_chooser_is_deterministic_and_picks_the_cheapest_available_route():
    for case in CHOOSER_CASES:
        chosen = routes.choose(case)
        assert chosen == routes.choose(case) == routes.choose(routes.Case(**case.__dict__))
        products, values = routes.available(case)
        assert chosen.forward in products and chosen.grad_x in products and chosen.values in values
        assert routes.cost(chosen.forward, case) == min(routes.cost(r, case) for r in products)
        assert routes.cost(chosen.grad_x, case, True) == min(routes.cost(r, case, True) for r in products)
        assert routes.cost(f"values {chosen.values}", case) == min(routes.cost(f"values {r}", case) for r in values)


def test_csr_routes_apply_only_to_sorted_positions_on_cpu_without_autocast():
    def case(**kw):
        args = {"dtype": torch.float32, "device": "cpu", "autocast": False, "strictly_sorted": True} | kw
        return routes.case_of(64, 96, 8, 200, **args)

    assert case().csr_products and case().csr_values
    assert case(dtype=torch.float64).csr_products
    for off in ({"strictly_sorted": False}, {"device": "meta"}):
        assert not case(**off).csr_products and not case(**off).csr_values
    for products_only in ({"autocast": True}, {"dtype": torch.bfloat16}, {"same_dtype": False}):
        assert not case(**products_only).csr_products and case(**products_only).csr_values
    assert routes.cheapest(routes.Case(64, 96, 8, 0, True, True)) == routes.Routes("gather", "gather", "gather")


def test_the_constants_are_those_of_the_calibration_results():
    stored = json.loads((Path(__file__).parents[1] / "benchmarks/results/route_calibration/constants.json")
                        .read_text())["costs"]
    assert set(stored) == set(routes.COSTS)
    for route, constants in routes.COSTS.items():
        assert constants == pytest.approx(stored[route], rel=1e-3), route
