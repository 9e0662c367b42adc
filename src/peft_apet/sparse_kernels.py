"""The k-sparse products behind a discrete delta `W~` of shape `(out, in)` with `k` entries at row-major positions.

A layer's forward and backward need three of them, all `O(tokens * k)`: `x W~^T` (forward), `g W~` (input
gradient) and `g^T x` sampled at the `k` positions (the value gradients). Each has several routes: CSR kernels
(MKL; CPU, sorted positions), gathers of the `k` needed columns (strided, so several times slower per
multiply-add), and for the value gradients also the dense `g^T x` then a gather. Which one runs is chosen by
`routes.choose` from a measured cost model; this module only runs them.

The index arrays of a mask (rows, columns, CSR row pointers, the transposed order) depend only on the mask, so
`functional.layout_of` keeps them per `MaskedWeight` (discrete masks up to density 1/8) until its index tensor is
replaced or changed in place. Each array is made when a route first needs it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch

# Elements per temporary `(chunk, tokens)` block in the gathered products (64 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 24
# Tokens per block of the sampled CSR value gradient: measured on one thread (768 x 3072 at density 1/8, 2,048
# tokens) 135 ms in blocks of 128 against 267 ms in one pass (blocks of 64 to 512: 134-145 ms).
_SAMPLED_TOKENS = 128


@dataclass(eq=False)
class SparseLayout:
    """Index arrays of `k` entries of an `(out, in)` matrix at int64 row-major positions `flat` `(k,)`.

    Each array is made when a kernel first needs it. Kept per mask, the CSR path holds `flat` plus three int32
    arrays (columns, transposed rows, transposed order): 20 bytes per entry; the gather path holds `flat`, rows
    and columns: 24 bytes per entry."""

    flat: torch.Tensor
    shape: tuple[int, int]

    @cached_property
    def rows(self) -> torch.Tensor:
        return self.flat // self.shape[1]

    @cached_property
    def cols(self) -> torch.Tensor:
        return self.flat % self.shape[1]

    @cached_property
    def strictly_sorted(self) -> bool:
        """Row-major order without repeats: one adapter's mask is; several adapters' concatenated ones are not."""
        return bool((self.flat[1:] > self.flat[:-1]).all())

    @cached_property
    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(crow (out + 1,), col (k,))`, int32 below 2**31 entries: the CSR layout of the (sorted) pattern."""
        crow = _row_pointers(self.flat // self.shape[1], self.shape[0])
        return crow, (self.flat % self.shape[1]).to(crow.dtype)

    @cached_property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(crow_t (in + 1,), col_t (k,), order (k,))`, int32 below 2**31 entries: the CSR layout of the
        `(in, out)` transpose, with `order` taking the stored values to it."""
        cols = self.flat % self.shape[1]
        order = torch.argsort(cols, stable=True)
        crow_t = _row_pointers(cols, self.shape[1])
        return crow_t, (self.flat[order] // self.shape[1]).to(crow_t.dtype), order.to(crow_t.dtype)

    @cached_property
    def compact(self) -> tuple[torch.Tensor, SparseLayout] | None:
        """`(used (u,), layout of the entries in the (out, u) matrix of those columns)` when the entries use at most
        a quarter of the `in` columns, else None: the value gradients `g[:, rows] * x[:, cols]` then need only
        `x[:, used]`, so a layer keeps a `(tokens, u)` copy of its input for backward instead of `x` itself.

        A quarter, because layers that read the same input (q, k, v) each keep their own copy where they shared
        `x` before: three quarters of it at most. Checked only for `k <= 4 * in` (a random mask of `k` entries
        uses about `in (1 - e^(-k / in))` columns, a quarter at `k ~ 0.29 in`; masks chosen by scores may use
        fewer)."""
        k, (out_f, in_f) = self.flat.numel(), self.shape
        if k == 0 or k > 4 * in_f:
            return None
        used, position = torch.unique(self.cols, sorted=True, return_inverse=True)
        if 4 * used.numel() > in_f:
            return None
        return used, SparseLayout(self.rows * used.numel() + position, (out_f, used.numel()))


def _row_pointers(row_of_entry: torch.Tensor, num_rows: int) -> torch.Tensor:
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=row_of_entry.device)
    crow[1:] = torch.bincount(row_of_entry, minlength=num_rows).cumsum(0)
    return crow.to(torch.int32) if row_of_entry.numel() < 2**31 else crow


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are plain MKL calls
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def add_x_wt(out: torch.Tensor, x: torch.Tensor, layout: SparseLayout, values: torch.Tensor, route: str) -> None:
    """`out += x W~^T` in place; `out` `(tokens, out)`, `x` `(tokens, in)`, `values` `(k,)`; `route`: `gather`,
    `csr_strided` or `csr_contiguous` (`routes.PRODUCT_ROUTES`)."""
    if route == "gather":
        _gathered_add(out, x, layout.cols, layout.rows, values)
    else:
        _add_product_t(out, _csr(*layout.csr, values.to(out.dtype), layout.shape), x, route)


def add_g_w(grad_x: torch.Tensor, g: torch.Tensor, layout: SparseLayout, values: torch.Tensor, route: str) -> None:
    """`grad_x += g W~` in place; `grad_x` `(tokens, in)`, `g` `(tokens, out)`, `values` `(k,)`; `route` as in
    `add_x_wt`."""
    if route == "gather":
        _gathered_add(grad_x, g, layout.rows, layout.cols, values)
    else:
        crow_t, col_t, order = layout.transposed
        delta_t = _csr(crow_t, col_t, values[order].to(grad_x.dtype), (layout.shape[1], layout.shape[0]))
        _add_product_t(grad_x, delta_t, g, route)


def _add_product_t(out: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, route: str) -> None:
    """`out += dense sparse^T` in place, as `out^T += sparse dense^T`; `out` `(tokens, m)`, `sparse` `(m, n)` CSR,
    `dense` `(tokens, n)`. `csr_strided` multiplies straight into transposed views (a higher cost per entry);
    `csr_contiguous` pays a transposed copy of `dense` and a transposed add of the `(m, tokens)` product."""
    if route == "csr_strided":
        out.t().addmm_(sparse, dense.t().to(out.dtype))
    elif route == "csr_contiguous":
        out.add_((sparse @ dense.t().to(out.dtype).contiguous()).t())
    else:
        raise ValueError(f"unknown CSR product route {route!r}")


def _gathered_add(out: torch.Tensor, source: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                  values: torch.Tensor) -> None:
    """`out[:, dst_idx[j]] += source[:, src_idx[j]] * values[j]`, in chunks of at most `_CHUNK_ELEMENTS`."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, source.shape[0]))
    vals = values.to(out.dtype)
    for i in range(0, values.numel(), chunk):
        part = source.index_select(1, src_idx[i:i + chunk]).to(out.dtype) * vals[i:i + chunk]
        out.index_add_(1, dst_idx[i:i + chunk], part)


def values_grad(g: torch.Tensor, x: torch.Tensor, layout: SparseLayout, route: str) -> torch.Tensor:
    """`d loss / d values[j] = sum_tokens g[:, rows[j]] * x[:, cols[j]]`, `(k,)`, accumulated in fp32 (fp64 for
    fp64 inputs); `g` `(tokens, out)`, `x` `(tokens, in)`; `route`: `gather`, `sampled_csr` (sorted positions
    only) or `dense` (the full `(out, in)` `g^T x`, transient, then gathered)."""
    acc = torch.promote_types(torch.promote_types(g.dtype, x.dtype), torch.float32)
    k = layout.flat.numel()
    if k == 0:
        return g.new_zeros(0, dtype=acc)
    if route == "dense":
        return (g.t().to(acc) @ x.to(acc)).reshape(-1)[layout.flat]
    if route == "sampled_csr":  # in blocks of tokens: see `_SAMPLED_TOKENS`
        pattern = _csr(*layout.csr, g.new_zeros(k, dtype=acc), layout.shape)
        grads = g.new_zeros(k, dtype=acc)
        for i in range(0, g.shape[0], _SAMPLED_TOKENS):
            block = slice(i, i + _SAMPLED_TOKENS)
            grads += torch.sparse.sampled_addmm(pattern, g[block].t().to(acc), x[block].to(acc), beta=0.0).values()
        return grads
    if route != "gather":
        raise ValueError(f"unknown value-gradient route {route!r}")
    chunk = max(1, _CHUNK_ELEMENTS // max(1, g.shape[0]))
    rows, cols = layout.rows, layout.cols
    return torch.cat([
        (g.index_select(1, rows[i:i + chunk]).to(acc) * x.index_select(1, cols[i:i + chunk]).to(acc)).sum(0)
        for i in range(0, k, chunk)
    ])
