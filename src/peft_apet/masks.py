"""Binary masks `m` of `W~ = W ⊙ m`, stored compactly.

A mask over a tensor of shape `shape` with `k` trainable entries is stored as an int32 index tensor:

- `discrete`: the `k` sorted flat (row-major) indices of the trainable entries.
- `adjacent`: the ids of the `ceil(k / line_length)` trainable lines, in order; a line is a row
  (`axis=0`, length `shape[1]`) or a column (`axis=1`, length `shape[0]`) of the 2-D view. Every line is
  whole except the last, which holds the first `k mod line_length` entries of its line.
- full (no mask): an empty index; all entries are trainable.

Sampling never materialises a permutation of all entries when `k` is small: `discrete_mask` draws candidate
indices with replacement and keeps distinct ones, so its cost is O(k log k) time and O(k) memory.
"""

from __future__ import annotations

import math
import zlib

import torch

INDEX_DTYPE = torch.int32


def stable_seed(*parts: object) -> int:
    """A seed derived from `parts` that is the same in every process (unlike the salted `hash()`)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view `(rows, columns)` masks use: 1-D tensors are one row."""
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) != 2:
        raise ValueError(f"masks support 1-D and 2-D tensors, got shape {tuple(shape)}")
    return shape[0], shape[1]


def line_length(shape: tuple[int, ...], axis: int) -> int:
    """Number of entries in one adjacent line of a tensor of `shape`."""
    rows, cols = as_2d(shape)
    if len(shape) == 1:
        return cols  # a vector is one line whatever the axis
    return cols if axis == 0 else rows


def num_lines(shape: tuple[int, ...], axis: int) -> int:
    rows, cols = as_2d(shape)
    if len(shape) == 1:
        return 1
    return rows if axis == 0 else cols


def _sample_distinct(population: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct integers drawn uniformly from `range(population)`, sorted (int64)."""
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * k > population:
        # Dense regime: a permutation is O(population) = O(k) here.
        return torch.randperm(population, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        # Oversample so that one round almost always suffices (collisions are rare when k << population).
        draw = torch.randint(0, population, (need + need // 4 + 16,), generator=generator)
        chosen = torch.cat([chosen, draw]).unique()
    if chosen.numel() > k:
        keep = torch.randperm(chosen.numel(), generator=generator)[:k]
        chosen = chosen[keep].sort().values
    return chosen


def discrete_mask(shape: tuple[int, ...], k: int, seed: int) -> torch.Tensor:
    """Sorted int32 flat indices of `k` entries of a tensor of `shape`, uniform without replacement.

    Args:
        shape: the tensor's shape (any number of dimensions; positions are row-major).
        k: how many entries to choose, `0 <= k <= prod(shape)`.
        seed: seed of the torch generator the draw uses (the same seed gives the same mask in any process).

    Returns:
        int32 tensor `(k,)` of sorted flat positions.
    """
    numel = math.prod(shape)
    if not 0 <= k <= numel:
        raise ValueError(f"cannot choose k={k} entries of a tensor with {numel} entries")
    if numel >= 2**31:
        raise ValueError(f"tensor with {numel} entries is too large for int32 indices")
    generator = torch.Generator().manual_seed(seed)
    return _sample_distinct(numel, k, generator).to(INDEX_DTYPE)


def adjacent_mask(shape: tuple[int, ...], k: int, axis: int, seed: int, ordered: bool = False) -> torch.Tensor:
    """int32 ids of the `ceil(k / line_length)` trainable lines; the last one is partial if needed.

    The lines are chosen uniformly at random (seeded) and sorted; the partial line, when there is one, is the
    last chosen line in sorted order. `ordered=True` takes lines `0, 1, 2, ...` instead (see `build_mask`).

    Args:
        shape: the tensor's shape; its lines are rows (`axis=0`) or columns (`axis=1`) of its 2-D view.
        k: how many entries the mask trains, `0 <= k <= prod(shape)`.
        axis: 0 trains rows, 1 trains columns.
        seed: seed of the torch generator the draw uses.
        ordered: take the first lines instead of random ones.

    Returns:
        int32 tensor `(ceil(k / line_length),)` of sorted line ids.
    """
    length = line_length(shape, axis)
    lines = num_lines(shape, axis)
    if not 0 <= k <= length * lines:
        raise ValueError(f"cannot choose k={k} entries of a tensor of shape {tuple(shape)}")
    if ordered:
        return torch.arange(math.ceil(k / length), dtype=INDEX_DTYPE)
    generator = torch.Generator().manual_seed(seed)
    return _sample_distinct(lines, math.ceil(k / length), generator).to(INDEX_DTYPE)


def flat_indices(shape: tuple[int, ...], mask: str | None, index: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """Row-major flat indices (int64, length k) of the trainable entries, in the order values are stored."""
    if mask is None:
        return torch.arange(k, device=index.device)
    if mask == "discrete":
        return index.long()
    rows, cols = as_2d(shape)
    length = line_length(shape, axis)
    offsets = torch.arange(length, device=index.device)
    lines = index.long()
    if len(shape) == 1:
        return offsets[:k]
    if axis == 0:  # line j = row lines[j]: entries lines[j] * cols + t
        flat = lines[:, None] * cols + offsets[None, :]
    else:  # line j = column lines[j]: entries t * cols + lines[j]
        flat = offsets[None, :] * cols + lines[:, None]
    return flat.reshape(-1)[:k]


def mask_to_dense(shape: tuple[int, ...], mask: str | None, index: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """The dense boolean mask `m` (for inspection and tests; never used in the forward pass)."""
    dense = torch.zeros(math.prod(shape), dtype=torch.bool)
    dense[flat_indices(shape, mask, index.cpu(), k, axis)] = True
    return dense.view(shape)


def build_mask(shape: tuple[int, ...], mask: str | None, k: int, axis: int, seed: int,
               ordered: bool = False) -> torch.Tensor:
    """The compact index for a mask kind (see module docstring).

    `ordered` (adjacent only) is used for the first matrix of a two-matrix path (LoRA A, adapter down,
    `axis=0`): its trainable rows are the first rank units, which the partial row of the second matrix (its
    first `rem` columns) always meets; independently random rows could leave the path with no live unit.
    """
    if mask is None:
        if k != math.prod(shape):
            raise ValueError(f"an unmasked tensor of shape {tuple(shape)} trains all its entries, not {k}")
        return torch.empty(0, dtype=INDEX_DTYPE)
    if mask == "discrete":
        return discrete_mask(shape, k, seed)
    if mask == "adjacent":
        return adjacent_mask(shape, k, axis, seed, ordered)
    raise ValueError(f"`mask` must be one of ['adjacent', 'discrete'] or None, got {mask!r}")


def _sample_besides(rows: int, length: int, taken: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct `(row, slot)` positions of a `(rows, length)` grid, none at `(r, taken[r])`: int64 `(k, 2)`."""
    if k == 0:
        return torch.empty(0, 2, dtype=torch.int64)
    free = _sample_distinct(rows * (length - 1), k, generator)
    row, slot = free // (length - 1), free % (length - 1)
    return torch.stack([row, slot + (slot >= taken[row]).long()], dim=1)


def aligned_pair_masks(units: int, first_line: int, second_line: int, k_first: int, k_second: int, mask: str,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact indices of the masks of a two-matrix path, drawn so that every entry can receive a gradient.

    The first matrix is `(units, first_line)` (LoRA A, adapter down) and holds unit `j` on row `j`; the second is
    `(second_line, units)` (LoRA B, adapter up) and holds unit `j` on column `j`. Units are chosen first (seeded,
    uniformly), then entries within them:
    - `"discrete"`: `c = min(units, k_first, k_second)` units, each with at least one entry in both matrices
      (a random one on its row and one on its column); the other entries are uniform over those units' row and
      column entries. Needs `k_first <= c * first_line` and `k_second <= c * second_line`
      (`peft_apet.budget.split_aligned_pair` chooses such counts).
    - `"adjacent"`: whole units, the first matrix by rows (`axis=0`) and the second by columns (`axis=1`), both
      listing the same units, so that their partial lines (the last listed) belong to the same unit.
    Returns the indices in the formats of `build_mask` (int32, sorted).
    """
    generator = torch.Generator().manual_seed(seed)
    if mask == "adjacent":
        used = max(math.ceil(k_first / first_line), math.ceil(k_second / second_line))
        lines = _sample_distinct(units, used, generator)
        return (lines[: math.ceil(k_first / first_line)].to(INDEX_DTYPE),
                lines[: math.ceil(k_second / second_line)].to(INDEX_DTYPE))
    c = min(units, k_first, k_second)
    if c == 0:  # fewer than one entry per matrix: no pair to align (the entry cannot learn; the tuner warns)
        return (discrete_mask((units, first_line), k_first, seed),
                discrete_mask((second_line, units), k_second, seed + 1))
    if k_first > c * first_line or k_second > c * second_line:
        raise ValueError(f"{k_first} + {k_second} entries do not fit {c} shared units of lengths "
                         f"{first_line} / {second_line}")
    chosen = _sample_distinct(units, c, generator)
    one_first = torch.randint(0, first_line, (c,), generator=generator)
    one_second = torch.randint(0, second_line, (c,), generator=generator)
    rest_first = _sample_besides(c, first_line, one_first, k_first - c, generator)
    rest_second = _sample_besides(c, second_line, one_second, k_second - c, generator)
    first_rows = torch.cat([torch.arange(c), rest_first[:, 0]])
    first_cols = torch.cat([one_first, rest_first[:, 1]])
    second_units = torch.cat([torch.arange(c), rest_second[:, 0]])
    second_rows = torch.cat([one_second, rest_second[:, 1]])
    first = (chosen[first_rows] * first_line + first_cols).sort().values
    second = (second_rows * units + chosen[second_units]).sort().values
    return first.to(INDEX_DTYPE), second.to(INDEX_DTYPE)


def learnable_pair_entries(first_rows: torch.Tensor, second_cols: torch.Tensor) -> tuple[int, int]:
    """How many entries of a two-matrix path can receive a gradient, `(first, second)`.

    `first_rows` `(k_first,)`: the unit (row) of each trainable entry of the first matrix; `second_cols`
    `(k_second,)`: the unit (column) of each trainable entry of the second. An entry can learn only if its unit has
    a trainable entry in the other matrix (the gradient of `A[j, c]` flows through column `j` of `B`, and that of
    `B[i, j]` through row `j` of `A`)."""
    first_units, second_units = first_rows.unique(), second_cols.unique()
    return (int(torch.isin(first_rows, second_units).sum()), int(torch.isin(second_cols, first_units).sum()))
