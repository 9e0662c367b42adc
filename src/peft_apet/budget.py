"""Exact budgets: how `num_trainable_params` is split across parts, modules and tensors.

The rule, applied at each level (parts -> modules -> tensors of a module), is *proportional to capacity
with largest remainders*: slot `i` of capacity `c_i` gets `floor(N c_i / C)` entries, and the
`N - sum(floor(...))` left over go one each to the slots with the largest fractional parts, ties broken by
slot order (the model's module order). It is deterministic, never exceeds a slot's capacity and sums to
exactly `N`.
"""

from __future__ import annotations

from collections.abc import Sequence


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
