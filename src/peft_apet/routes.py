"""Which kernels a discrete delta `W~` `(out, in)` with `k` entries runs: chosen in one place, from a cost model.

A layer `y = x (W + W~)^T + b` on `tokens` rows needs three things, each with several routes (`Routes`):
- the forward `x W~^T` and the input gradient `g W~` (product routes, `PRODUCT_ROUTES`):
  `gather` (the `k` columns gathered, strided: `O(tokens * k)`), `csr_strided` and `csr_contiguous` (MKL CSR
  products written into transposed views, or through transposed contiguous copies of the source and the product:
  `O(tokens * k)` plus `O(tokens * (out + in))` copies), and `composed` (a transient contiguous `W + W~`, `O(out *
  in)`, then the one matmul the frozen layer does anyway: freed after use, so no dense `(out, in)` tensor is kept
  between forward and backward), and `patched` (the same matmul on `W` itself with the k values added in place and
  its k entries written back after it: `O(k)`, no copy; only where autograd records the call, on a contiguous plain
  weight, see `functional._effective_weight`). The side path of quantized bases (`side=True`) has no `W` to compose
  with: its dense route `dense_delta` builds `W~` alone and pays an extra `(tokens, in) x (in, out)` matmul.
- the value gradients `(g^T x)[rows, cols]` (`VALUES_ROUTES`): `gather` (k gathered dot products), `sampled_csr`
  (`torch.sparse.sampled_addmm` at the k sorted positions, in fp32/fp64) and `dense` (the full `g^T x`, a weight
  gradient formed transiently, then gathered).

`choose` returns, for each of the three, the available route of least modelled cost: a cost per route is a linear
function of a few counts of the case (`features`), with constants `COSTS` (seconds) fitted by
`benchmarks/route_calibration.py` on this project's CPU, fp32, one thread (results and fit:
`benchmarks/results/route_calibration/`). The same constants serve fp64, bf16 autocast and CUDA, where no
calibration has run: they rank routes by work and memory traffic, not by a device's speed. The choice depends only
on the case, never on timing at run time, so runs stay reproducible. `forced(...)` overrides it (tests, benchmarks).

No route keeps the composed `W + W~` of the forward for the backward: the package promises that no dense `(out,
in)` tensor is held between them, and composing again costs under 3 % of the layer's own matmul (calibration run:
0.06-1.6 ms against 10-58 ms on BERT-base's layers at 512 tokens). There is no measure-at-run-time mode.

CSR products need a CPU, fp32/fp64 activations and output of one dtype, no autocast and positions in strictly
increasing row-major order (one adapter's mask; several adapters' concatenated masks are not), and no
`torch.compile` tracing; the sampled CSR value gradient needs the same but for the dtype and autocast (it runs
in fp32/fp64).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

PRODUCT_ROUTES = ("gather", "csr_strided", "csr_contiguous", "composed", "dense_delta", "patched")
# Product routes that run the frozen layer's own matmul on `W + W~` (built once per direction, serving it whole).
WEIGHT_ROUTES = ("composed", "patched")
VALUES_ROUTES = ("gather", "sampled_csr", "dense")
_CSR_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Case:
    """What a route's cost depends on: the delta `(out, in)` with `k` entries, applied to `tokens` rows."""

    out: int
    in_: int
    tokens: int
    k: int
    csr_products: bool = False  # CSR products apply (see the module docstring)
    csr_values: bool = False  # the sampled CSR value gradient applies
    side: bool = False  # the side path of a quantized base: no W to compose `W + W~` with
    patchable: bool = False  # `W` may be patched in place for a product (the `patched` route)

    @property
    def numel(self) -> int:
        return self.out * self.in_


@dataclass(frozen=True)
class Routes:
    """The route of the forward `x W~^T`, of the input gradient `g W~` and of the value gradients."""

    forward: str
    grad_x: str
    values: str


def features(route: str, case: Case, transposed: bool = False) -> tuple[float, ...]:
    """The counts a route's cost is linear in; `transposed`: the input gradient `g W~` (source width `out`,
    destination width `in`) rather than the forward `x W~^T`."""
    t, k, numel = case.tokens, case.k, case.numel
    src, dst = (case.out, case.in_) if transposed else (case.in_, case.out)
    return {
        "gather": (1.0, t * k),
        "csr_strided": (1.0, t * k, t * src, t * dst, k),
        "csr_contiguous": (1.0, t * k, t * src, t * dst, k),
        "composed": (1.0, numel, k),
        "patched": (1.0, k),
        "dense_delta": (1.0, numel, k, t * numel),
        "values gather": (1.0, t * k),
        "values sampled_csr": (1.0, t * k, t * (case.out + case.in_), k),
        "values dense": (1.0, t * numel, k),
    }[route]


# Seconds per count of `features`, fitted by `benchmarks/route_calibration.py` (CPU, fp32, one thread; run of
# 2026-11-30, rounded to 4 digits: benchmarks/results/route_calibration/constants.json; its results.md: the model
# picks the fastest measured route in 211 of 225 choices, and its picks take 1.015x the fastest routes' time).
COSTS: dict[str, tuple[float, ...]] = {
    "gather": (1.169e-05, 1.616e-09),
    "csr_strided": (1.171e-05, 5.467e-10, 1.944e-10, 5.075e-10, 1.297e-09),
    "csr_contiguous": (0.0, 1.196e-10, 7.804e-10, 1.678e-09, 0.0),
    "composed": (1.203e-06, 1.218e-10, 1.376e-09),
    "patched": (1.11e-05, 3.933e-09),
    "dense_delta": (5.482e-06, 1.385e-10, 1.237e-09, 2.036e-11),
    "values gather": (1.444e-05, 1.302e-09),
    "values sampled_csr": (2.296e-05, 8.455e-11, 7.483e-10, 0.0),
    "values dense": (1.595e-05, 2.018e-11, 2.574e-09),
}


def cost(route: str, case: Case, transposed: bool = False) -> float:
    """Modelled seconds of one route (`"values <route>"` for the value gradients)."""
    return sum(c * f for c, f in zip(COSTS[route], features(route, case, transposed)))


def available(case: Case) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The product routes and the value-gradient routes that apply to `case`."""
    products = ("gather",) + (("csr_strided", "csr_contiguous") if case.csr_products else ()) + (
        ("dense_delta",) if case.side else ("composed",)) + (("patched",) if case.patchable and not case.side else ())
    values = ("gather",) + (("sampled_csr",) if case.csr_values else ()) + ("dense",)
    return products, values


@lru_cache(maxsize=4096)
def cheapest(case: Case) -> Routes:
    """The available routes of least modelled cost (first in `available`'s order on ties); k = 0 gathers (a no-op).
    Cached: a layer meets the same few cases call after call, and pricing every route is Python arithmetic (about
    20 us a call, against 10-100 us for the k-sparse products of a small layer at a few dozen tokens)."""
    products, values = available(case)
    if case.k == 0:
        return Routes("gather", "gather", "gather")
    return Routes(_least(products, lambda r: cost(r, case)), _least(products, lambda r: cost(r, case, True)),
                  _least(values, lambda r: cost(f"values {r}", case)))


def _least(names: tuple[str, ...], price) -> str:
    """The first of `names` of least `price` (a loop: `torch.compile` cannot trace `min` with a key)."""
    best, best_price = names[0], price(names[0])
    for name in names[1:]:
        if price(name) < best_price:
            best, best_price = name, price(name)
    return best


_forced: dict[str, str] = {}


@contextmanager
def forced(forward: str | None = None, grad_x: str | None = None, values: str | None = None) -> Iterator[None]:
    """Within the block, `choose` returns these routes (those given) instead of the cheapest; a forced route must
    be available for every case met (else `ValueError`)."""
    global _forced
    saved = _forced
    _forced = {n: r for n, r in (("forward", forward), ("grad_x", grad_x), ("values", values)) if r is not None}
    try:
        yield
    finally:
        _forced = saved


def case_of(out: int, in_: int, tokens: int, k: int, *, dtype: torch.dtype, device: str, autocast: bool,
            strictly_sorted: bool, same_dtype: bool = True, side: bool = False, patchable: bool = False) -> Case:
    """The `Case` of a delta `(out, in)` with `k` entries on `tokens` rows of activations of `dtype` on the device
    of type `device` ("cpu", "cuda", ...); `autocast`: autocast is on there; `same_dtype`: the layer's output has the
    activations' dtype; `strictly_sorted`: the positions are in strictly increasing row-major order; `patchable`: the
    base weight may be patched in place (`functional._patchable`, in a call autograd records)."""
    csr_values = device == "cpu" and strictly_sorted and k > 0 and not torch.compiler.is_compiling()
    csr_products = csr_values and dtype in _CSR_DTYPES and same_dtype and not autocast
    return Case(out, in_, tokens, k, csr_products, csr_values, side, patchable)


def choose(case: Case) -> Routes:
    """The routes of `case`: the cheapest by the cost model, or those `forced`."""
    # torch.compile traces the function itself (it would warn that it ignores the cache)
    routes = cheapest.__wrapped__(case) if torch.compiler.is_compiling() else cheapest(case)
    if not _forced:
        return routes
    routes = replace(routes, **_forced)
    products, values = available(case)
    if routes.forward not in products or routes.grad_x not in products or routes.values not in values:
        raise ValueError(f"forced routes {routes} are not all available for {case} (products {products}, value "
                         f"gradients {values})")
    return routes
