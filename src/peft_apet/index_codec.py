"""Elias-Fano coding of discrete mask indices: how an adapter file stores which entries a mask trains.

In memory a discrete mask is an int32 tensor of `k` sorted flat positions `p_0 < ... < p_{k-1}` in a tensor of
`n` entries (4 bytes each). In a module's state dict it is this code, a 1-D uint8 tensor under the same `index` key
(see `MaskedWeight`); an adapter file holds one such code per role over all that role's tensors
(`peft_apet.packing`). With `L = floor(log2(n / k))` (0 when `k > n / 2`) and `L = 8 q + r` (`r < 8`):

1. the low `r` bits of every position, as one bit stream (entry `i` in bits `i r .. i r + r - 1`, least significant
   bit first, bytes filled from their least significant bit): `ceil(k r / 8)` bytes;
2. bits `r .. L - 1` of every position as `q` whole bytes, little-endian, entry after entry: `k q` bytes;
3. the high parts `p_i >> L` in unary: a bitmap (same bit order as 1) with a one at `(p_i >> L) + i` for each `i`,
   `k + ((n - 1) >> L) + 1` bits, so `ceil((k + ((n - 1) >> L) + 1) / 8)` bytes.

No header: `k` (the length of `values`) and `n` (the tensor's size) are known to the reader. Since
`(n - 1) >> L < 2 k`, the code takes at most `k (L + 3)` bits plus 2 bytes of padding, that is
`log2(n / k) + 3` bits per entry at worst and `log2(n / k) + 2` when `n / k` is a power of two.

Sizes per entry (bytes, measured on n = 2^30): 0.38 at density 1/2, 1.49 at 1/1000, 2.00 at 1/16384, 2.32 at
1/10^5, 2.74 at 1/10^6. So an fp32 value plus its position costs <= 6 bytes down to density 1/16384, but not
below: no code can do that there. The entropy bound is `log2 C(n, k) / k ≈ log2(n / k) + log2(e)` bits per entry
(`log2 e ≈ 1.44`): 15.44 bits at 1/16384, 16.0 bits (2 bytes) at about 1/24100, 18.05 bits at 1/10^5, 21.4 bits
at 1/10^6. Elias-Fano stays within about 0.6 bits of it for sparse masks (1 bit at density 1/2, 2 bits at 1).

Why Elias-Fano: it is near the entropy bound at every density, needs no entropy coder or tables, and both
directions are a handful of vectorised tensor operations (10^7 entries take a fraction of a second). Its usual
weakness, no cheap random access, costs nothing here: a mask is always read whole.
"""

from __future__ import annotations

import torch


def low_bits(count: int, universe: int) -> int:
    """`L = floor(log2(universe / count))` (0 when count > universe / 2 or count is 0)."""
    return max(0, (universe // count).bit_length() - 1) if count else 0


def _high_bits(count: int, universe: int) -> int:
    """Length in bits of the unary bitmap of the high parts."""
    return count + ((universe - 1) >> low_bits(count, universe)) + 1


def encoded_size(count: int, universe: int) -> int:
    """Bytes of the code of `count` positions in `[0, universe)`."""
    if count == 0:
        return 0
    q, r = divmod(low_bits(count, universe), 8)
    return (count * r + 7) // 8 + count * q + (_high_bits(count, universe) + 7) // 8


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack(fields: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 or bool `(m,)`, each `< 2**width` (`1 <= width <= 7`) -> uint8 `(ceil(m width / 8),)`: their bit
    stream. Works on bytes throughout: 8x less memory traffic than int64 for these large tensors."""
    bits = (fields[:, None] >> _SHIFTS[:width]) & 1 if width > 1 else fields
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits.reshape(-1)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack(data: torch.Tensor, m: int, width: int) -> torch.Tensor:
    """Inverse of `_pack`: uint8 `(ceil(m width / 8),)` -> uint8 `(m,)`."""
    bits = (data[:, None] & _BIT_WEIGHTS).ne(0).view(torch.uint8).view(-1)[: m * width]
    if width == 1:
        return bits
    return (bits.view(m, width) * _BIT_WEIGHTS[:width]).sum(1, dtype=torch.uint8)


def encode_indices(index: torch.Tensor, universe: int) -> torch.Tensor:
    """The uint8 code `(encoded_size(k, universe),)` of `index`: `k` strictly increasing positions in
    `[0, universe)`, any integer dtype and device. Raises ValueError for anything else (nothing is saved that would
    not decode to the same positions)."""
    index = index.detach().cpu().to(torch.int64).reshape(-1)
    count = index.numel()
    if count == 0:
        return torch.empty(0, dtype=torch.uint8)
    if int(index[0]) < 0 or int(index[-1]) >= universe or not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"cannot encode a mask index that is not strictly increasing in [0, {universe})")
    bits = low_bits(count, universe)
    q, r = divmod(bits, 8)
    parts = [_pack((index & ((1 << r) - 1)).to(torch.uint8), r)] if r else []
    if q:
        whole = index >> r
        parts.append(torch.stack([(whole >> (8 * b)) & 0xFF for b in range(q)], 1).to(torch.uint8).view(-1))
    high = torch.zeros(_high_bits(count, universe), dtype=torch.bool)
    high[(index >> bits) + torch.arange(count)] = True
    parts.append(_pack(high, 1))
    return torch.cat(parts)


def decode_indices(code: torch.Tensor, count: int, universe: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The positions `(count,)` (int32, or `dtype` for universes beyond int32), strictly increasing, stored in
    `code` (from `encode_indices`).

    Raises ValueError if `code` is not such a code: not 1-D uint8, wrong length (truncated, or the code of another
    tensor or budget), a high-part bitmap with the wrong number of ones, or positions not strictly increasing in
    `[0, universe)`.
    """
    if code.dtype != torch.uint8 or code.dim() != 1:
        raise ValueError(f"an encoded mask index is a 1-D uint8 tensor, got {tuple(code.shape)} ({code.dtype})")
    expected = encoded_size(count, universe)
    if code.numel() != expected:
        raise ValueError(f"encoded mask index of {code.numel()} bytes, expected {expected} for {count} entries of a "
                         f"tensor of {universe} (damaged, or saved for another tensor or budget)")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    code = code.cpu()
    bits = low_bits(count, universe)
    q, r = divmod(bits, 8)
    small, whole = (count * r + 7) // 8, count * q
    length = _high_bits(count, universe)
    ones = _unpack(code[small + whole:], (length + 7) // 8 * 8, 1).nonzero().view(-1)
    if ones.numel() != count or int(ones[-1]) >= length:
        raise ValueError(f"encoded mask index is damaged: its high-part bitmap marks {ones.numel()} entries, "
                         f"expected {count}")
    positions = (ones - torch.arange(count)) << bits
    if r:
        positions |= _unpack(code[:small], count, r)
    if q:
        planes = code[small:small + whole].view(count, q).to(torch.int64)
        for b in range(q):
            positions |= planes[:, b] << (r + 8 * b)
    if int(positions[-1]) >= universe or not bool((positions[1:] > positions[:-1]).all()):
        raise ValueError("encoded mask index is damaged: its positions are not strictly increasing in "
                         f"[0, {universe})")
    return positions.to(dtype)


def stored_positions(stored: torch.Tensor, count: int, universe: int) -> torch.Tensor:
    """The positions a state dict holds for a discrete mask: decoded if `stored` is a code, else `stored` itself
    (integer positions: peft-apet 0.1 files, or a tensor the caller built).

    A code whose dtype was changed wholesale with the rest of a state dict (`{k: v.float() ...}`) is still read as a
    code: bytes 0..255 survive fp32, fp16 and bf16 exactly. A floating tensor is a code if its length is the
    code's and not `count`; if both lengths agree, it is whichever reading is valid (positions strictly increasing
    in range, or a well-formed code), and ValueError if both or neither are.
    """
    if stored.dtype == torch.uint8:
        return decode_indices(stored, count, universe)
    if not stored.is_floating_point() or stored.dim() != 1 or stored.numel() != encoded_size(count, universe):
        return stored
    values = stored.detach().cpu()
    as_code = None
    if bool(((values >= 0) & (values <= 255) & (values == values.round())).all()):
        try:
            as_code = decode_indices(values.to(torch.uint8), count, universe)
        except ValueError:
            pass
    if stored.numel() != count:
        if as_code is None:
            raise ValueError(f"encoded mask index of dtype {stored.dtype} is damaged (not a code of {count} entries "
                             f"of a tensor of {universe})")
        return as_code
    plain = values.to(torch.int64)
    plain_valid = bool((values == plain).all()) and (count == 0 or (
        int(plain.min()) >= 0 and int(plain.max()) < universe and bool((plain[1:] > plain[:-1]).all())))
    if plain_valid == (as_code is not None):
        raise ValueError(f"the mask index of dtype {stored.dtype} can be read both as positions and as an encoded "
                         "index, or as neither; load the state dict without converting its integer tensors")
    return as_code if as_code is not None else stored
