"""Budget split: exact, proportional, deterministic (checked against the rule computed by hand)."""

from __future__ import annotations

import pytest

from peft_apet.budget import allocate_budget, avoid_unpaired_counts, density_to_count, split_config_budget


def test_allocate_budget_largest_remainders_by_hand():
    # capacities 10, 20, 30 (C = 60), N = 10: quotas 1.67, 3.33, 5 -> floors 1, 3, 5, leftover 1 -> largest
    # fractional part is slot 0 (0.67).
    assert allocate_budget([10, 20, 30], 10) == [2, 3, 5]
    # ties broken by order: 3 equal slots, 2 entries -> the first two
    assert allocate_budget([5, 5, 5], 2) == [1, 1, 0]


@pytest.mark.parametrize("total", [0, 1, 7, 31, 97, 600])
def test_allocate_budget_is_exact_and_capped(total):
    caps = [1, 9, 100, 17, 473]
    shares = allocate_budget(caps, total)
    assert sum(shares) == total
    assert all(0 <= s <= c for s, c in zip(shares, caps))


def test_allocate_budget_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"num_trainable_params.*\[1, 30\]"):
        allocate_budget([10, 20], 31)
    with pytest.raises(ValueError, match="num_trainable_params"):
        allocate_budget([10, 20], -1)


def test_density_to_count():
    assert density_to_count(0.1, 1000) == 100
    assert density_to_count(1e-9, 1000) == 1
    assert density_to_count(1.0, 1000) == 1000


def test_split_config_budget_fixed_parts_then_remainder():
    caps = {"lora": 400, "bias": 50, "delta": 1000}
    # bias unmasked (fixed at 50), lora has its own 100, delta absorbs the rest of 1000.
    assert split_config_budget(caps, {"bias": 50, "lora": 100}, 1000, None) == {"bias": 50, "lora": 100, "delta": 850}
    # two free parts share the remainder in proportion to capacity: 140 * 400/1400 = 40, 140 * 1000/1400 = 100
    assert split_config_budget(caps, {"bias": 50}, 190, None) == {"bias": 50, "lora": 40, "delta": 100}


def test_split_config_budget_errors():
    caps = {"lora": 400, "delta": 1000}
    with pytest.raises(ValueError, match="no budget"):
        split_config_budget(caps, {}, None, None)
    with pytest.raises(ValueError, match="num_trainable_params"):
        split_config_budget(caps, {"lora": 400}, 300, None)
    with pytest.raises(ValueError, match="at least one masked part"):
        split_config_budget(caps, {"lora": 400, "delta": 10}, 500, None)


@pytest.mark.parametrize("counts,mask,pull,expected", [
    ([65, 64, 64, 64], "adjacent", True, [66, 63, 64, 64]),  # no module can take the lone entry: it takes one
    ([65, 64, 64, 64], "adjacent", False, [65, 64, 64, 64]),  # rule 1 (saved adapters) leaves it
    ([65, 10, 0, 64], "adjacent", True, [64, 11, 0, 64]),  # a module that can take it gets it
    ([1, 256, 0, 0], "discrete", True, [2, 255, 0, 0]),  # the other is full: a partner comes from it
    ([1, 0, 0, 0], "discrete", True, [1, 0, 0, 0]),  # nobody can give: stays (reported as unable to learn)
])
def test_unpaired_module_counts(counts, mask, pull, expected):
    """Unit length 64 per module (LoRA A and B lines), capacity 256; the total never changes."""
    assert avoid_unpaired_counts(counts, [256] * 4, [64] * 4, mask, pull) == expected
