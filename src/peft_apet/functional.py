"""How masked tensors enter the forward pass of a linear layer `y = x W^T + b`, with `W` of shape `(out, in)`.

The three operations of the paper reduce to:
- `masked_delta_linear`: `x (W + W~)^T + b` for a masked delta on the base weight (Add, "arbitrary
  positions in the PLM");
- `lora_output`: `scaling · dropout(x) A~^T B~^T` (Concatenate, low-rank path);
- `adapter_output`: `y + σ(y D~^T) U~^T` (Plugin).

Discrete deltas use a custom autograd function so that no dense `(out, in)` tensor is kept between forward and
backward. The forward is `x W^T + b` plus the k-sparse product `x W~^T`, or `x (W + W~)^T + b` through a transient
composed copy of `W + W~` (freed after the matmul) or, in a training step, through `W` itself with the k values
added for the matmul and its entries written back after it (`_effective_weight`); the backward is `g W + g W~`
or `g (W + W~)` (again a transient copy, or `W` patched again), and the `k` value gradients: k-sparse products, or the
dense weight gradient `g^T x` formed transiently and gathered. `routes.choose` picks each of the three per call from
the layer's shape, token count, `k`, dtype and device (`sparse_kernels` runs the sparse ones). For the value
gradients a layer keeps its input `x` `(tokens, in)`, or, when the k entries use at most a quarter of the `in`
columns, a copy of only those columns (`SparseLayout.compact`): at small k a delta then keeps O(tokens * k) of
activations per layer, not O(tokens * in). Adjacent deltas are dense blocks of whole lines, so they run as one small
matmul per layer and keep for backward the input (trained rows) or only its trained columns (trained columns).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import routes
from .modules import storage_key
from .sparse_kernels import SparseLayout, add_g_w, add_x_wt, values_grad

if TYPE_CHECKING:  # annotations only: this module imports nothing of the package but its kernels and routes
    from .masked_weight import MaskedWeight


class _DiscreteDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layout: SparseLayout, values, recorded: bool = False):
        # weight: (out, in) view of the frozen base weight (may be strided, e.g. transposed Conv1D weights);
        # recorded: grad mode was on at the call (forward itself runs without it); with some input needing a
        # gradient, autograd records this call: a training step
        out_f, in_f = weight.shape
        xs = x.reshape(-1, in_f)
        recorded = recorded and any(ctx.needs_input_grad)
        # checked before `_patchable`, whose `is_inference` would break a traced graph
        patchable = recorded and not torch.compiler.is_compiling() and _patchable(weight)
        chosen = _routes_of(layout, xs, weight.dtype, patchable=patchable)
        if chosen.forward in routes.WEIGHT_ROUTES:
            with _effective_weight(weight, layout, values, chosen.forward) as effective:
                out = F.linear(x, effective, bias)
        else:  # x W^T + b, then the k entries of x W~^T added in place: no dense copy of W
            out = F.linear(x, weight, bias)
            add_x_wt(out.view(-1, out_f), xs, layout, values, chosen.forward)
        ctx.save_for_backward(_kept_input(x, layout), weight, values)
        ctx.layout, ctx.routes, ctx.has_bias = layout, chosen, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept_x, weight, values = ctx.saved_tensors
        layout, chosen = ctx.layout, ctx.routes
        out_f, in_f = weight.shape
        g = grad_out.reshape(-1, out_f)  # the dtype of the forward's output (the autocast dtype under autocast)
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            if chosen.grad_x in routes.WEIGHT_ROUTES:
                # under create_graph (grad mode on here) the product saves `W + W~` for the double backward: a
                # patched `W` would be restored under it, so such a backward composes a copy
                route = "composed" if torch.is_grad_enabled() else chosen.grad_x
                with _effective_weight(weight, layout, values, route) as effective:
                    grad_x = grad_out @ effective.to(grad_out.dtype)
            else:
                grad_x = grad_out @ weight.to(grad_out.dtype)
                add_g_w(grad_x.view(-1, in_f), g, layout, values, chosen.grad_x)
        if ctx.needs_input_grad[1]:
            raise RuntimeError("APET masked deltas expect a frozen base weight (requires_grad=False).")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[4]:
            grad_values = _values_grad(g, kept_x, layout, chosen.values).to(values.dtype)
        return grad_x, None, grad_bias, None, grad_values, None


def _kept_input(x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """What of a layer's input `x` `(..., in)` its backward keeps for the value gradients: `(tokens, u)`, only the
    columns the entries use, when the layout is `compact`, else `x` itself (no copy; saving the input rather than a
    view of it keeps `torch.compile` from breaking the graph)."""
    compact = _compact(layout)
    return x if compact is None else x.reshape(-1, x.shape[-1]).index_select(1, compact[0])


def _compact(layout: SparseLayout) -> tuple[torch.Tensor, SparseLayout] | None:
    """`layout.compact`, or None while `torch.compile` traces (its `torch.unique` is data-dependent)."""
    return None if torch.compiler.is_compiling() else layout.compact


def _values_grad(g: torch.Tensor, kept_x: torch.Tensor, layout: SparseLayout, route: str) -> torch.Tensor:
    """The `(k,)` value gradients from what `_kept_input` kept, by `route` (chosen for the whole input). On the kept
    columns the entries form an `(out, u)` layout of their own, strictly sorted where the whole one is, so every
    value-gradient route applies to it unchanged, at less cost (`dense` forms `(out, u)`, not `(out, in)`)."""
    compact = _compact(layout)
    return values_grad(g, kept_x.reshape(-1, kept_x.shape[-1]), layout if compact is None else compact[1], route)


def _routes_of(layout: SparseLayout, xs: torch.Tensor, out_dtype: torch.dtype, side: bool = False,
               patchable: bool = False) -> routes.Routes:
    """The routes of a delta with `layout` on activations `xs` `(tokens, in)` whose product is of `out_dtype`
    (`routes.choose`); `patchable`: the base weight may be patched in place (`_patchable`, and autograd records the
    call). While `torch.compile` traces, the CSR and patched routes are off and nothing data-dependent is read."""
    k = layout.flat.numel()
    device = xs.device.type
    csr = not torch.compiler.is_compiling() and k > 0 and device == "cpu" and layout.strictly_sorted
    case = routes.case_of(*layout.shape, xs.shape[0], k, dtype=xs.dtype, device=device, strictly_sorted=csr,
                          autocast=csr and torch.is_autocast_enabled(device), same_dtype=out_dtype == xs.dtype,
                          side=side, patchable=patchable)
    return routes.choose(case)


def _composed(weight: torch.Tensor, layout: SparseLayout, values: torch.Tensor) -> torch.Tensor:
    """A transient contiguous `W + W~` `(out, in)`."""
    effective = weight.clone(memory_format=torch.contiguous_format)
    effective.view(-1).index_add_(0, layout.flat, values.to(effective.dtype))
    return effective


def _patchable(weight: torch.Tensor) -> bool:
    """Whether the `patched` route may add `W~` to `weight` in place for one product: a contiguous plain tensor (not
    a subclass such as FSDP's DTensor shards) that is not an inference tensor."""
    return weight.is_contiguous() and type(weight.data) is torch.Tensor and not weight.is_inference()


@contextmanager
def _effective_weight(weight: torch.Tensor, layout: SparseLayout, values: torch.Tensor,
                      route: str) -> Iterator[torch.Tensor]:
    """`W + W~` `(out, in)` for the length of the block.

    `composed`: a transient contiguous copy, `O(out * in)`. `patched`: `W` itself with the `k` values added at their
    positions, and the `k` entries it held written back on exit, also on error: `O(k)`, no copy, and `W` leaves the
    block bit for bit as it entered (the sum `W + W~` is that of `composed`). Chosen only where autograd records the
    call (a training step: grad mode on and some input needing a gradient), never for inference, where threads may
    share a model. Patched blocks on one weight are serialized across threads (multithreaded training), but while
    one runs, a reader of `W` outside APET's products in another thread (e.g. a tied embedding) would see `W + W~`.
    Written through `.data`, whose version counter is its own, so autograd nodes that saved `W` (a layer applied
    twice, tied weights) do not see an in-place change: `W` is restored before their backward runs."""
    if route == "composed":
        yield _composed(weight, layout, values)
        return
    flat = weight.data.view(-1)
    with _patch_lock(flat):
        held = flat.index_select(0, layout.flat)  # repeated positions (several adapters) hold the same entry
        try:
            flat.index_add_(0, layout.flat, values.to(flat.dtype))
            yield flat.view(weight.shape)
        finally:
            flat.index_copy_(0, layout.flat, held)


_PATCH_LOCKS: dict[tuple[str, int], threading.Lock] = {}
_PATCH_LOCKS_GUARD = threading.Lock()


def _patch_lock(flat: torch.Tensor) -> threading.Lock:
    """The lock of the storage `flat` lives in (one per storage address and device, kept for the process: a lock
    per patched weight, reused if the address is)."""
    key = storage_key(flat)
    with _PATCH_LOCKS_GUARD:
        return _PATCH_LOCKS.setdefault(key, threading.Lock())


def _joint_layout(deltas: list[MaskedWeight], values: list[torch.Tensor] | None,
                  device: torch.device) -> tuple[SparseLayout, torch.Tensor]:
    """One layout of the entries of all `deltas` (same `(out, in)` shape), on `device`, and their `(k,)` values:
    `values[i]` for delta i (e.g. after dropout), or the deltas' own values when `values` is None."""
    values = [d.values for d in deltas] if values is None else values
    if len(deltas) == 1:
        layout, joint = layout_of(deltas[0]), values[0]
    else:
        layout = SparseLayout(torch.cat([d.flat_indices() for d in deltas]), tuple(deltas[0].shape))
        joint = torch.cat(values)
    if layout.flat.device != device:
        layout = SparseLayout(layout.flat.to(device), layout.shape)
    return layout, joint


def masked_delta_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, deltas: list[MaskedWeight],
    values: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`x (W + sum_i W~_i)^T + b` for discrete or unmasked deltas; `weight` is `(out, in)`, `x` is `(..., in)`;
    `values`: the `(k_i,)` values to use for each delta (default: its own)."""
    layout, joint = _joint_layout(deltas, values, weight.device)
    return _DiscreteDeltaLinear.apply(x, weight, bias, layout, joint, torch.is_grad_enabled())


def adjacent_delta_output(x: torch.Tensor, delta: MaskedWeight, result: torch.Tensor,
                          values: torch.Tensor | None = None) -> torch.Tensor:
    """`result + x W~^T` for an adjacent mask of whole rows (`axis=0`) or columns (`axis=1`) of W~ `(out, in)`;
    `values`: the `(k,)` values to use (default: the delta's own).

    Costs one `(tokens, in) x (in, lines)` matmul: proportional to the number of trainable entries.
    """
    out_f, in_f = delta.shape
    k = delta.num_entries
    length = in_f if delta.axis == 0 else out_f
    lines = delta.index.long()
    full, rem = divmod(k, length)
    values = delta.values if values is None else values
    x = x.to(values.dtype)
    if delta.axis == 0:  # trainable rows: output features lines[j] get x . V[j]
        if full:
            result = _AddRowProducts.apply(result, x, lines[:full], values[: full * length].view(full, length))
        if rem:  # a partial row reads the first `rem` inputs. Without whole rows and with rem <= in / 4, keep only
            # those for backward; otherwise a view of x (shared with the layer's neighbours, e.g. q/k/v) is cheaper.
            head = x[..., :rem].contiguous() if not full and 4 * rem <= length else x[..., :rem]
            partial = (head @ values[full * length:]).unsqueeze(-1)
            result = result.index_add(-1, lines[full:full + 1], partial.to(result.dtype))
        return result
    # trainable columns: input feature lines[j] contributes x[..., lines[j]] * V[j] to every output
    if full:
        result = result + (x[..., lines[:full]] @ values[: full * length].view(full, length)).to(result.dtype)
    if rem:
        partial = x.index_select(-1, lines[full:full + 1]) * values[full * length:]  # a copy: no view of x kept
        result = result + F.pad(partial, (0, out_f - rem)).to(result.dtype)
    return result


class _AddRowProducts(torch.autograd.Function):
    """`result` `(..., out)` with `x V^T` `(..., lines)` added at output features `lines`, for `x` `(..., in)` and
    whole trainable rows `V` `(lines, in)`. Keeps `x` (only if `V` needs a gradient) and `V` (only if `x` does) for
    backward, not the `(tokens, lines)` product that autograd's `index_add` would also keep (it saves its source)."""

    @staticmethod
    def forward(ctx, result, x, lines, v):
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, lines, v if ctx.needs_input_grad[1] else None)
        ctx.x_dtype, ctx.v_dtype = x.dtype, v.dtype
        return result.index_add(-1, lines, F.linear(x, v).to(result.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, lines, v = ctx.saved_tensors
        g = grad_out.index_select(-1, lines)  # (..., lines): the gradient of the added product
        grad_x = (g.to(v.dtype) @ v).to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        grad_v = None
        if ctx.needs_input_grad[3]:
            grad_v = (g.reshape(-1, lines.numel()).T.to(x.dtype) @ x.reshape(-1, x.shape[-1])).to(ctx.v_dtype)
        return grad_out if ctx.needs_input_grad[0] else None, grad_x, None, grad_v


def lora_output(x: torch.Tensor, lora_a: MaskedWeight, lora_b: MaskedWeight, scaling: float,
                dropout: torch.nn.Module) -> torch.Tensor:
    """`scaling · dropout(x) A^T B^T` with A `(r, in)` and B `(out, r)`, in the adapter's dtype."""
    a, b = lora_a.dense(), lora_b.dense()
    return F.linear(F.linear(dropout(x.to(a.dtype)), a), b) * scaling


ACTIVATION_FUNCTIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda t: t,
}


def adapter_output(y: torch.Tensor, down: MaskedWeight, up: MaskedWeight, activation: str) -> torch.Tensor:
    """Houlsby plug-in `y + σ(y D^T) U^T` with D `(bottleneck, d)` and U `(d, bottleneck)`."""
    d, u = down.dense(), up.dense()
    return y + F.linear(ACTIVATION_FUNCTIONS[activation](F.linear(y.to(d.dtype), d)), u).to(y.dtype)


# ---------------------------------------------------------------------------------------------- sparse side path
class _AddSparseDelta(torch.autograd.Function):
    """`result += x W~^T` in place, for a k-entry delta `W~` `(out, in)`, `result` `(..., out)` the (contiguous)
    output of the base layer; backward: the gradient of `result` passes through, `g W~` for `x`, and the k value
    gradients.

    Saves `x` (or the columns of it the entries use, `_kept_input`) and the values only, and allocates no
    `(tokens, out)` tensor of its own. Routes as in `masked_delta_linear` (`routes.choose` with `side=True`), except
    that the dense one, `dense_delta`, has no `W` to compose with: it forms the `(out, in)` delta alone,
    transiently, and pays an extra matmul."""

    @staticmethod
    def forward(ctx, result, x, layout: SparseLayout, values):
        out_f, in_f = layout.shape
        xs = x.reshape(-1, in_f)
        chosen = _routes_of(layout, xs, result.dtype, side=True)
        flat = result.view(-1, out_f)
        if chosen.forward == "dense_delta":
            flat.add_(F.linear(xs, _delta_dense(layout, values, xs.dtype)).to(flat.dtype))
        else:
            add_x_wt(flat, xs, layout, values, chosen.forward)
        ctx.mark_dirty(result)
        ctx.save_for_backward(_kept_input(x, layout), values)
        ctx.layout, ctx.routes, ctx.x_shape, ctx.x_dtype = layout, chosen, x.shape, x.dtype
        return result

    @staticmethod
    def backward(ctx, grad_out):
        kept_x, values = ctx.saved_tensors
        layout, chosen = ctx.layout, ctx.routes
        out_f, in_f = layout.shape
        g = grad_out.reshape(-1, out_f)
        grad_x = grad_values = None
        if ctx.needs_input_grad[1]:
            if chosen.grad_x == "dense_delta":
                grad_x = (g @ _delta_dense(layout, values, g.dtype)).to(ctx.x_dtype)
            else:
                grad_x = g.new_zeros(g.shape[0], in_f, dtype=ctx.x_dtype)
                add_g_w(grad_x, g, layout, values, chosen.grad_x)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_values = _values_grad(g, kept_x, layout, chosen.values).to(values.dtype)
        return grad_out, grad_x, None, grad_values


class _DequantizedDeltaLinear(torch.autograd.Function):
    """`x (W + W~)^T + b` for a base whose `W` `(out, in)` exists only as `dequantize()` (a quantized layer): `W + W~`
    is composed in a transient copy in forward and again in backward, as the quantized layer's own autograd
    dequantizes `W` for each of its two matmuls. Saves what `_kept_input` keeps and the values, no dense tensor."""

    @staticmethod
    def forward(ctx, x, dequantize: Callable[[], torch.Tensor], bias, layout: SparseLayout, values):
        in_f = layout.shape[1]
        out = F.linear(x, _dequantized_composed(dequantize, layout, values, x.dtype), bias)
        ctx.save_for_backward(_kept_input(x, layout), values)
        ctx.dequantize, ctx.layout, ctx.has_bias = dequantize, layout, bias is not None
        ctx.values_route = _routes_of(layout, x.reshape(-1, in_f), x.dtype).values
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept_x, values = ctx.saved_tensors
        layout = ctx.layout
        g = grad_out.reshape(-1, layout.shape[0])
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _dequantized_composed(ctx.dequantize, layout, values, grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[4]:
            grad_values = _values_grad(g, kept_x, layout, ctx.values_route).to(values.dtype)
        return grad_x, None, grad_bias, None, grad_values


def _dequantized_composed(dequantize: Callable[[], torch.Tensor], layout: SparseLayout, values: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """A transient `dequantize() + W~` `(out, in)` in `dtype` (`dequantize` returns a new tensor each call)."""
    weight = dequantize().to(dtype).contiguous()
    weight.view(-1).index_add_(0, layout.flat, values.to(dtype))
    return weight


def dequantized_delta_linear(x: torch.Tensor, dequantize: Callable[[], torch.Tensor], bias: torch.Tensor | None,
                             deltas: list[MaskedWeight], values: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`x (W + sum_i W~_i)^T + b` for discrete or unmasked deltas on a base whose weight `W` `(out, in)` is read
    only through `dequantize()` (a new tensor per call), in `x`'s dtype; `x` is `(..., in)`; `values` as in
    `masked_delta_linear`. For a quantized layer whose own forward would dequantize `W` anyway (`quantized.py`):
    the delta then costs one `index_add` of k values per matmul instead of k-sparse products."""
    layout, joint = _joint_layout(deltas, values, x.device)
    return _DequantizedDeltaLinear.apply(x, dequantize, bias, layout, joint)


def _delta_dense(layout: SparseLayout, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out_f, in_f = layout.shape
    dense = values.new_zeros(out_f * in_f, dtype=dtype)
    return dense.index_add_(0, layout.flat, values.to(dtype)).view(out_f, in_f)


def add_sparse_delta(result: torch.Tensor, x: torch.Tensor, deltas: list[MaskedWeight],
                     values: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`result + x sum_i W~_i^T` for discrete or unmasked deltas `W~_i` `(out, in)`, from their values and indices
    only; `x` is `(..., in)`, `result` `(..., out)` the base layer's output, which is updated in place (the base
    layer's own autograd does not keep its output) unless it is a view, a leaf or not contiguous. `values`: the
    `(k_i,)` values to use for each delta (default: its own)."""
    layout, joint = _joint_layout(deltas, values, x.device)
    if not result.is_contiguous() or result._is_view() or result.is_leaf and result.requires_grad:
        result = result.clone(memory_format=torch.contiguous_format)
    return _AddSparseDelta.apply(result, x, layout, joint)


def prepare_layouts(deltas: list[MaskedWeight], input_gradients: bool = True) -> None:
    """Build the index arrays the side path of these discrete deltas will use, now rather than in the first forward
    pass: made there, these small long-lived arrays land between the large transient buffers in which bitsandbytes
    dequantizes each weight, and glibc then keeps the freed buffers (measured on SmolLM2-135M in nf4 at k = 1e4:
    RSS after the first forward 468 MiB instead of 292 MiB). The routes depend on the token count, not known yet:
    sorted masks get their CSR arrays, and masks below the layer's width (or unsorted) their rows and columns.
    `input_gradients=False` leaves out the transposed CSR arrays (8 bytes per entry) of the input gradient's sparse
    product: for 4-bit layers, whose training steps add the delta to the dequantized weight instead (made on first
    use where a side path does need them, e.g. one-token training inputs)."""
    for delta in deltas:
        if (delta.mask != "discrete" or len(delta.shape) != 2 or delta.index.is_meta
                or delta.index.device.type != "cpu"):
            continue  # side paths are 2-D weight deltas; a bias part's vector has none
        layout = layout_of(delta)
        if layout.strictly_sorted:
            layout.csr  # noqa: B018 - a cached property, computed here
            if input_gradients:
                layout.transposed  # noqa: B018
        if not layout.strictly_sorted or delta.num_entries < max(layout.shape):
            layout.rows, layout.cols  # noqa: B018
        if layout.compact is not None:  # long-lived too: the used columns and their sub-layout's arrays
            sub = layout.compact[1]
            sub.rows, sub.cols  # noqa: B018
            if sub.strictly_sorted:
                sub.csr  # noqa: B018 - only value gradients run on it: no transposed arrays


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Densest discrete mask whose index arrays are kept between calls (the routes' calibration went up to this
# density). Above it they would take more memory than they save time (8-24 bytes per entry against the 4 of a
# weight entry), so they are rebuilt, transiently, per call; unmasked deltas never keep any.
_KEPT_DENSITY = 1 / 8


def layout_of(delta: MaskedWeight) -> SparseLayout:
    """The layout of `delta`'s mask, computed once per index tensor (and in-place version of it) for discrete masks
    up to `_KEPT_DENSITY`, else per call."""
    numel = delta.shape[0] * delta.shape[1]
    if (torch.compiler.is_compiling()  # traced once per graph (the cache is plain Python state)
            or delta.mask != "discrete" or delta.num_entries > _KEPT_DENSITY * numel):
        return SparseLayout(delta.flat_indices(), tuple(delta.shape))
    index = delta.index
    hit = _LAYOUTS.get(delta)
    if hit is not None and hit[0] is index and hit[1] == index._version:
        return hit[2]
    layout = SparseLayout(delta.flat_indices(), tuple(delta.shape))
    _LAYOUTS[delta] = (index, index._version, layout)
    return layout
