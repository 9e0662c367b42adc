"""How masked tensors enter the forward pass of a linear layer `y = x W^T + b`, with `W` of shape `(out, in)`.

The three operations of the paper reduce to:
- `masked_delta_linear`: `x (W + W~)^T + b` for a masked delta on the base weight (Add, "arbitrary
  positions in the PLM");
- `lora_output`: `scaling · dropout(x) A~^T B~^T` (Concatenate, low-rank path);
- `adapter_output`: `y + σ(y D~^T) U~^T` (Plugin).

Discrete deltas use a custom autograd function so that no dense `(out, in)` tensor is kept between forward
and backward. While `8 * tokens * k <= out * in` (the usual sparse regime) no dense copy of `W` is made at all: the
forward is `x W^T + b` plus the `k` products `x[:, cols] * values` added into their output columns, the input
gradient `g W` plus `g[:, rows] * values` added into their input columns; denser deltas add the `k` values into
a transient copy of `W` (freed after the matmul) instead. The backward computes the `k` value gradients as `k`
dot products of length `tokens` instead of a dense weight gradient. On CPU in fp32/fp64, once `k` reaches the
layer's width, the three sparse products run as CSR kernels (`W~ x^T`, `W~^T g^T` and the sampled `g^T x` at the
`k` positions) instead of gathers: strided gathers cost several times more per multiply-add. Adjacent deltas are
dense blocks of whole lines, so they run as one small matmul per layer.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .masked_weight import MaskedWeight

# Above this density a dense weight-gradient matmul followed by a gather beats k gathered dot products.
_DENSE_GRAD_DENSITY = 0.125
# Elements per temporary `(chunk, tokens)` block in the gathered dot products (64 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 24


def _csr(dst: torch.Tensor, src: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The `(dst_dim, src_dim)` CSR matrix with `values[j]` at `(dst[j], src[j])`; `dst` must be non-decreasing."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=dst.device)
    crow[1:] = torch.bincount(dst, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are plain MKL calls
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, src, values, shape, check_invariants=False)


def _use_csr(t: torch.Tensor, flat: torch.Tensor, out_f: int, in_f: int) -> bool:
    """CSR kernels exist on CPU for fp32/fp64; they need row-major sorted positions (one adapter's mask is sorted,
    several adapters' concatenated positions are not). Measured on one 3072 x 768 layer, 64 to 1024 tokens, the
    gathers are as fast below `k` of about the layer's width and several times slower above it."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or flat.numel() < max(out_f, in_f):
        return False
    return bool((flat[1:] > flat[:-1]).all())


def _values_grad(grad_out: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, in_features: int,
                 csr: bool = False) -> torch.Tensor:
    """`d loss / d values[j] = sum_tokens grad_out[:, rows[j]] * x[:, cols[j]]`, shape `(k,)`, accumulated in fp32
    (fp64 for fp64 inputs)."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    xs = x.reshape(-1, x.shape[-1])
    acc = torch.promote_types(torch.promote_types(g.dtype, xs.dtype), torch.float32)
    k = flat.numel()
    if k == 0:
        return grad_out.new_zeros(0, dtype=acc)
    if k >= _DENSE_GRAD_DENSITY * g.shape[1] * xs.shape[1]:
        return (g.t().to(acc) @ xs.to(acc)).reshape(-1)[flat]
    rows, cols = flat // in_features, flat % in_features
    if csr:  # the sampled product g^T x at the k (sorted) positions
        pattern = _csr(rows, cols, g.new_zeros(k, dtype=acc), (g.shape[1], in_features))
        return torch.sparse.sampled_addmm(pattern, g.t().to(acc).contiguous(), xs.to(acc), beta=0.0).values()
    # Gather the k needed columns of (tokens, out) and (tokens, in): transposing whole matrices first costs more.
    chunk = max(1, _CHUNK_ELEMENTS // max(1, g.shape[0]))
    parts = [
        (g.index_select(1, rows[i:i + chunk]).to(acc) * xs.index_select(1, cols[i:i + chunk]).to(acc)).sum(0)
        for i in range(0, k, chunk)
    ]
    return torch.cat(parts)


def _sparse_apply(dense_out: torch.Tensor, source: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                  values: torch.Tensor, csr: bool = False, dst_sorted: bool = False) -> torch.Tensor:
    """`dense_out[:, dst_idx[j]] += source[:, src_idx[j]] * values[j]` for the `k` entries, on 2-D views, in place.

    This is `x W~^T` (source = x, src = cols, dst = rows) or `g W~` (source = g, src = rows, dst = cols) with W~
    the k-sparse delta: `O(tokens * k)` work, as one CSR product (`csr`) or in gathered chunks of at most
    `_CHUNK_ELEMENTS` temporaries."""
    tokens = source.shape[0]
    k = values.numel()
    if csr:
        if not dst_sorted:
            order = torch.argsort(dst_idx, stable=True)
            dst_idx, src_idx, values = dst_idx[order], src_idx[order], values[order]
        delta = _csr(dst_idx, src_idx, values.to(dense_out.dtype), (dense_out.shape[1], source.shape[1]))
        return dense_out.add_((delta @ source.t().to(dense_out.dtype).contiguous()).t())
    chunk = max(1, _CHUNK_ELEMENTS // max(1, tokens))
    vals = values.to(dense_out.dtype)
    for i in range(0, k, chunk):
        part = source.index_select(1, src_idx[i:i + chunk]).to(dense_out.dtype) * vals[i:i + chunk]
        dense_out.index_add_(1, dst_idx[i:i + chunk], part)
    return dense_out


def _use_sparse_path(tokens: int, k: int, numel: int) -> bool:
    """The k-sparse product costs about `tokens * k` gathered (strided, so slow) multiply-adds; composing `W + W~`
    costs two copies of the `numel` entries of W per step. Measured on CPU (one 3072 x 768 layer, 64 tokens), the
    gathers win up to `tokens * k` of about `numel / 5`: take the sparse path below `numel / 8`."""
    return 8 * tokens * k <= numel


class _DiscreteDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, flat, values):
        # weight: (out, in) view of the frozen base weight (may be strided, e.g. transposed Conv1D weights)
        out_f, in_f = weight.shape
        xs = x.reshape(-1, in_f)
        sparse = _use_sparse_path(xs.shape[0], flat.numel(), out_f * in_f)
        if sparse:  # x W^T + b, then the k entries of x W~^T added in place: no dense copy of W
            out = F.linear(x, weight, bias)
            rows, cols = flat // in_f, flat % in_f
            ctx.csr = _use_csr(out, flat, out_f, in_f)
            _sparse_apply(out.view(-1, out_f), xs, cols, rows, values, csr=ctx.csr, dst_sorted=True)
        else:
            ctx.csr = False
            effective = weight.clone(memory_format=torch.contiguous_format)
            effective.view(-1).index_add_(0, flat, values.to(effective.dtype))
            out = F.linear(x, effective, bias)
        ctx.save_for_backward(x, weight, flat, values)
        ctx.has_bias = bias is not None
        ctx.sparse = sparse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, flat, values = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            if ctx.sparse:
                out_f, in_f = weight.shape
                grad_x = grad_out @ weight.to(grad_out.dtype)
                rows, cols = flat // in_f, flat % in_f
                csr = ctx.csr and grad_x.dtype in (torch.float32, torch.float64)
                _sparse_apply(grad_x.view(-1, in_f), grad_out.reshape(-1, out_f), rows, cols, values, csr=csr)
            else:
                effective = weight.clone(memory_format=torch.contiguous_format)
                effective.view(-1).index_add_(0, flat, values.to(effective.dtype))
                grad_x = grad_out @ effective.to(grad_out.dtype)  # under autocast grad_out is in the autocast dtype
                del effective
        if ctx.needs_input_grad[1]:
            raise RuntimeError("APET masked deltas expect a frozen base weight (requires_grad=False).")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[4]:
            csr = ctx.csr and grad_out.dtype in (torch.float32, torch.float64)
            grad_values = _values_grad(grad_out, x, flat, weight.shape[1], csr=csr).to(values.dtype)
        return grad_x, None, grad_bias, None, grad_values


def masked_delta_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, deltas: list[MaskedWeight]
) -> torch.Tensor:
    """`x (W + sum_i W~_i)^T + b` for discrete or unmasked deltas; `weight` is `(out, in)`, `x` is `(..., in)`."""
    flat = torch.cat([d.flat_indices() for d in deltas]) if len(deltas) > 1 else deltas[0].flat_indices()
    values = torch.cat([d.values for d in deltas]) if len(deltas) > 1 else deltas[0].values
    return _DiscreteDeltaLinear.apply(x, weight, bias, flat.to(weight.device), values)


def adjacent_delta_output(x: torch.Tensor, delta: MaskedWeight, result: torch.Tensor) -> torch.Tensor:
    """`result + x W~^T` for an adjacent mask of whole rows (`axis=0`) or columns (`axis=1`) of W~ `(out, in)`.

    Costs one `(tokens, in) x (in, lines)` matmul: proportional to the number of trainable entries.
    """
    out_f, in_f = delta.shape
    k = delta.num_entries
    length = in_f if delta.axis == 0 else out_f
    lines = delta.index.long()
    full, rem = divmod(k, length)
    values = delta.values
    x = x.to(values.dtype)
    if delta.axis == 0:  # trainable rows: output features lines[j] get x . V[j]
        if full:
            result = result.index_add(-1, lines[:full], F.linear(x, values[: full * length].view(full, length))
                                      .to(result.dtype))
        if rem:
            partial = (x[..., :rem] @ values[full * length:]).unsqueeze(-1)
            result = result.index_add(-1, lines[full:full + 1], partial.to(result.dtype))
        return result
    # trainable columns: input feature lines[j] contributes x[..., lines[j]] * V[j] to every output
    if full:
        result = result + (x[..., lines[:full]] @ values[: full * length].view(full, length)).to(result.dtype)
    if rem:
        partial = x[..., lines[full]].unsqueeze(-1) * values[full * length:]
        result = result + F.pad(partial, (0, out_f - rem)).to(result.dtype)
    return result


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
