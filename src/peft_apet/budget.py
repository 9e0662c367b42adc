"""Exact budgets: how `num_trainable_params` is split across parts, modules and tensors.

The rule, applied at each level (parts -> modules -> tensors of a module), is *proportional to capacity
with largest remainders*: slot `i` of capacity `c_i` gets `floor(N c_i / C)` entries, and the
`N - sum(floor(...))` left over go one each to the slots with the largest fractional parts, ties broken by
slot order (the model's module order). It is deterministic, never exceeds a slot's capacity and sums to
exactly `N`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def allocate_budget(capacities: Sequence[int], total: int, owner: str = "num_trainable_params") -> list[int]:
    """Split `total` entries across slots of the given capacities, proportionally (largest remainders)."""
    capacity = sum(capacities)
    if total < 0 or total > capacity:
        raise ValueError(f"`{owner}` must be in [1, {capacity}] (what the targets can hold), got {total}.")
    if capacity == 0:
        return [0 for _ in capacities]
    shares = [total * c // capacity for c in capacities]
    remainders = [total * c % capacity for c in capacities]
    leftover = total - sum(shares)
    order = sorted(range(len(capacities)), key=lambda i: (-remainders[i], i))
    for i in order[:leftover]:
        shares[i] += 1
    return shares


def density_to_count(density: float, capacity: int) -> int:
    """The number of entries a density means for a capacity: rounded, at least 1."""
    return min(capacity, max(1, round(density * capacity)))


def split_config_budget(
    capacities: dict[str, int],
    fixed: dict[str, int],
    total: int | None,
    density: float | None,
) -> dict[str, int]:
    """Budget of each part, given the config-level budget.

    Args:
        capacities: capacity (entries of all its tensors) of every part, by operation.
        fixed: parts whose count is already decided (unmasked parts: their capacity; parts with their
            own budget: that budget).
        total / density: the config-level budget, if any (exact total over all parts).

    Returns:
        operation -> number of trainable entries.
    """
    free = [op for op in capacities if op not in fixed]
    if total is None and density is None:
        if free:
            raise ValueError(
                f"parts {free} have a mask but no budget: set `num_trainable_params` or `density` on the part "
                "or on the APETConfig."
            )
        return dict(fixed)
    if not free:
        raise ValueError(
            "a config-level `num_trainable_params`/`density` needs at least one masked part without a budget of "
            "its own to absorb it."
        )
    free_capacity = sum(capacities[op] for op in free)
    if density is not None:
        remaining = density_to_count(density, free_capacity)
    else:
        remaining = total - sum(fixed.values())
        if remaining < 1 or remaining > free_capacity:
            raise ValueError(
                f"`num_trainable_params`={total} leaves {remaining} entries for the masked parts {free} after the "
                f"fixed parts ({sum(fixed.values())}); it must be in [{sum(fixed.values()) + 1}, "
                f"{sum(fixed.values()) + free_capacity}]."
            )
    shares = allocate_budget([capacities[op] for op in free], remaining)
    return {**fixed, **dict(zip(free, shares))}


def split_aligned_pair(k: int, units: int, first_line: int, second_line: int, mask: str) -> tuple[int, int]:
    """Entries `(k_first, k_second)` of a two-matrix part's module whose masks share rank (bottleneck) units.

    The first matrix (LoRA A `(units, in)`, adapter down `(units, d)`) holds a unit's entries on row `j`
    (`first_line` of them), the second (LoRA B `(out, units)`, adapter up `(d, units)`) on column `j`
    (`second_line`). An entry of one matrix can receive a gradient only if its unit has an entry in the other, so:
    - `"discrete"`: the proportional split, moved as little as needed so that `c = min(units, k_first,
      k_second)` units can hold both sides (`k_first <= c * first_line`, `k_second <= c * second_line`);
    - `"adjacent"`: whole units, `c = ceil(k / (first_line + second_line))`; the last unit's row and column
      are both partial, split proportionally. With one entry past whole units (`k = (c - 1) L + 1`) that entry
      has no partner: it goes to the first matrix and cannot learn (`avoid_unpaired_counts` avoids such module
      counts wherever another module can take the entry or give one).
    `k < 2` gives `(k, 0)`: no pair fits.
    """
    if k < 2:
        return k, 0
    if mask == "adjacent":
        length = first_line + second_line
        units_used = -(-k // length)
        rem = k - (units_used - 1) * length
        if rem == 1:
            return (units_used - 1) * first_line + 1, (units_used - 1) * second_line
        rem_first = min(max(round(rem * first_line / length), 1, rem - second_line), first_line, rem - 1)
        return (units_used - 1) * first_line + rem_first, (units_used - 1) * second_line + rem - rem_first

    def fits(k_first: int) -> bool:
        k_second = k - k_first
        c = min(units, k_first, k_second)
        return k_first >= 1 and k_second >= 1 and k_first <= c * first_line and k_second <= c * second_line

    start = allocate_budget([units * first_line, units * second_line], k)[0]
    for step in range(k):
        for k_first in (start - step, start + step):
            if 1 <= k_first < k and fits(k_first):
                return k_first, k - k_first
    raise ValueError(f"no split of {k} entries fits a pair of {units} units")  # unreachable for k <= capacity


def avoid_unpaired_counts(counts: list[int], capacities: list[int], unit_lengths: list[int], mask: str,
                          pull: bool = True) -> list[int]:
    """Move single entries between modules of a two-matrix part so that no module is left with an entry that
    has no partner: a count of 1 (discrete), or one entry past whole units (adjacent, `count % L == 1` with
    `L` the module's unit length `first_line + second_line`). The total stays exact. A module's lone entry goes
    to the module with the most entries that can take it without becoming unpaired itself (ties in model order).
    Where none can and `pull` is set, the module takes one entry from the module with the most entries that can
    give one without becoming unpaired (so 65/64/64/64 with L = 64 becomes 66/63/64/64); where neither is
    possible the count stays (and the entry is reported as unable to learn). `pull=False` is the rule of adapters
    saved by peft-apet 0.1 and 0.2.0.dev0 (`APETConfig.budget_split_version` 1)."""
    counts = list(counts)

    def unpaired(i: int, c: int) -> bool:
        return c == 1 if mask == "discrete" else c % unit_lengths[i] == 1

    for i in range(len(counts)):
        if not unpaired(i, counts[i]):
            continue
        if move_lone_entry(counts, i, lambda j: 1 <= counts[j] < capacities[j] and not unpaired(j, counts[j] + 1)):
            continue
        if pull and counts[i] < capacities[i] and not unpaired(i, counts[i] + 1):
            givers = [j for j in range(len(counts)) if j != i and counts[j] >= 1 and not unpaired(j, counts[j] - 1)]
            if givers:
                j = max(givers, key=lambda g: counts[g])  # max() keeps the first of equal counts
                counts[j] -= 1
                counts[i] += 1
    return counts


def move_lone_entry(counts: list[int], i: int, can_take: Callable[[int], bool]) -> bool:
    """Move one entry from `counts[i]` to the largest other count `j` with `can_take(j)` (ties: the first), in place;
    leave `counts` as it is when none can take it. Returns whether an entry moved."""
    takers = [j for j in range(len(counts)) if j != i and can_take(j)]
    if not takers:
        return False
    j = max(takers, key=lambda t: counts[t])  # max() keeps the first of equal counts
    counts[i] -= 1
    counts[j] += 1
    return True
