"""Elias-Fano coding of discrete mask indices: how an adapter file stores which entries a mask trains.

In memory a discrete mask is an int32 tensor of `k` sorted flat positions in a tensor of `n` entries (4 bytes
each). On disk it is this code, a uint8 tensor under the same `index` key (see `MaskedWeight`):

- `L = floor(log2(n / k))` low bits of every position, packed: `k * L` bits;
- the high parts `p >> L` in unary, as a bitmap with a one at `(p_i >> L) + i`: `k + ((n - 1) >> L) + 1` bits;
- both padded to whole bytes, low part first. No header: `k` (the length of `values`) and `n` (the tensor's size)
  are known to the reader.

That is at most `k * (L + 3)` bits, within 2 bits per entry of the entropy bound `log2 C(n, k) / k ≈
log2(n / k) + 1.44` bits, for every density. In bytes per entry: 1.4 at density 1/1000, 2.0 at 1/16384 (so an fp32
value plus its position costs <= 6 bytes down to that density), 2.3 at 1/100000 and 2.7 at 1/10^6; below density
~1/23000 no code can store a position in 2 bytes. Elias-Fano is near the bound, needs no entropy coder, and encodes
and decodes with a handful of vectorised tensor operations (a mask is always read whole, so its lack of cheap
random access costs nothing here).
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_CHUNK = 1 << 20  # entries whose low bits are expanded at once (a multiple of 8, so chunks pack to whole bytes)


def low_bits(count: int, universe: int) -> int:
    """`L = floor(log2(universe / count))` (0 when count >= universe / 2 or count is 0)."""
    return max(0, (universe // count).bit_length() - 1) if count else 0


def encoded_size(count: int, universe: int) -> int:
    """Bytes of the code of `count` positions in `[0, universe)`."""
    if count == 0:
        return 0
    bits = low_bits(count, universe)
    return (count * bits + 7) // 8 + (count + ((universe - 1) >> bits) + 1 + 7) // 8


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """bool `(m,)` -> uint8 `(ceil(m / 8),)`, little-endian within each byte."""
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack(data: torch.Tensor) -> torch.Tensor:
    """uint8 `(m,)` -> bool `(8 m,)`."""
    return (data.view(-1, 1) & _BIT_WEIGHTS).ne(0).view(-1)


def encode_indices(index: torch.Tensor, universe: int) -> torch.Tensor:
    """The uint8 code of `index` (strictly increasing positions in `[0, universe)`, any integer dtype)."""
    index = index.detach().cpu().to(torch.int64).reshape(-1)
    count = index.numel()
    if count == 0:
        return torch.empty(0, dtype=torch.uint8)
    bits = low_bits(count, universe)
    shifts = torch.arange(bits, dtype=torch.int64)
    low = [_pack(((index[i:i + _CHUNK, None] >> shifts) & 1).bool().reshape(-1)) for i in range(0, count, _CHUNK)]
    high = torch.zeros(count + ((universe - 1) >> bits) + 1, dtype=torch.bool)
    high[(index >> bits) + torch.arange(count)] = True
    return torch.cat([*low, _pack(high)])


def decode_indices(code: torch.Tensor, count: int, universe: int) -> torch.Tensor:
    """The int32 positions stored in `code` (from `encode_indices(index, universe)` with `count` entries).

    Raises ValueError if `code` is not such a code: wrong dtype or length, a high-part bitmap with the wrong number
    of ones, or positions that are not strictly increasing in `[0, universe)`.
    """
    if code.dtype != torch.uint8 or code.dim() != 1:
        raise ValueError(f"an encoded mask index is a 1-D uint8 tensor, got {tuple(code.shape)} ({code.dtype})")
    expected = encoded_size(count, universe)
    if code.numel() != expected:
        raise ValueError(f"encoded mask index of {code.numel()} bytes, expected {expected} for {count} entries of a "
                         f"tensor of {universe} (damaged, or saved for another tensor or budget)")
    if count == 0:
        return torch.empty(0, dtype=torch.int32)
    code = code.cpu()
    bits = low_bits(count, universe)
    low_bytes = (count * bits + 7) // 8
    ones = _unpack(code[low_bytes:]).nonzero().flatten()
    if ones.numel() != count or int(ones[-1]) >= count + ((universe - 1) >> bits) + 1:
        raise ValueError(f"encoded mask index is damaged: its high-part bitmap marks {ones.numel()} entries, "
                         f"expected {count}")
    positions = (ones - torch.arange(count)) << bits
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    for start in range(0, count if bits else 0, _CHUNK):
        n = min(_CHUNK, count - start)
        chunk = code[start * bits // 8: (start * bits + n * bits + 7) // 8]
        low = _unpack(chunk)[: n * bits].view(n, bits).to(torch.int64)
        positions[start:start + n] |= (low * weights).sum(1)
    if int(positions[-1]) >= universe or (count > 1 and not bool((positions[1:] > positions[:-1]).all())):
        raise ValueError("encoded mask index is damaged: its positions are not strictly increasing in "
                         f"[0, {universe})")
    return positions.to(torch.int32)


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
