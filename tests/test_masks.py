"""Masks: exact sizes, uniformity, compactness, reproducibility across processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from peft_apet.masks import adjacent_mask, build_mask, discrete_mask, flat_indices, mask_to_dense, stable_seed


@pytest.mark.parametrize("shape,k", [((7, 5), 1), ((7, 5), 13), ((7, 5), 35), ((64,), 17), ((3, 1000), 2999)])
def test_discrete_mask_has_exactly_k_distinct_sorted_entries(shape, k):
    index = discrete_mask(shape, k, seed=3)
    assert index.dtype == torch.int32 and index.numel() == k
    assert torch.equal(index, index.unique())  # unique() sorts: distinct and sorted
    assert int(index.min()) >= 0 and int(index.max()) < math.prod(shape)
    assert int(mask_to_dense(shape, "discrete", index, k, 0).sum()) == k


def test_discrete_mask_is_seeded():
    a, b = discrete_mask((50, 40), 100, seed=1), discrete_mask((50, 40), 100, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, discrete_mask((50, 40), 100, seed=2))


def test_discrete_mask_is_uniform():
    # Every entry of a 4x5 matrix is chosen with probability k/n; count over many seeds (binomial, 6 sigma).
    n, k, trials = 20, 5, 4000
    counts = torch.zeros(n)
    for seed in range(trials):
        counts[discrete_mask((4, 5), k, seed).long()] += 1
    p = k / n
    sigma = math.sqrt(trials * p * (1 - p))
    assert (counts - trials * p).abs().max() < 6 * sigma


def test_discrete_mask_never_permutes_a_large_population(monkeypatch):
    calls = []
    real = torch.randperm

    def spy(n, *args, **kwargs):
        calls.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", spy)
    index = discrete_mask((4096, 11008), 1000, seed=0)
    assert index.numel() == 1000 and index.element_size() * index.numel() == 4000  # kilobytes, not megabytes
    assert all(n <= 2 * 1000 + 16 for n in calls), calls


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [1, 6, 7, 30, 41, 42])
def test_adjacent_mask_whole_lines_and_one_partial(axis, k):
    shape = (6, 7)
    index = adjacent_mask(shape, k, axis, seed=5)
    length = 7 if axis == 0 else 6
    assert index.numel() == math.ceil(k / length)
    dense = mask_to_dense(shape, "adjacent", index, k, axis)
    assert int(dense.sum()) == k
    lines = dense if axis == 0 else dense.T
    sizes = lines.sum(1)
    full, rem = divmod(k, length)
    assert int((sizes == length).sum()) == full
    if rem:
        partial = lines[int(index[-1])]
        assert int(partial.sum()) == rem and bool(partial[:rem].all())  # the first `rem` entries of its line


def test_flat_indices_follow_stored_order():
    shape, k = (4, 3), 5
    index = torch.tensor([2, 0], dtype=torch.int32)
    assert flat_indices(shape, "adjacent", index, k, 0).tolist() == [6, 7, 8, 0, 1]
    assert flat_indices(shape, "adjacent", index, 6, 1).tolist() == [2, 5, 8, 11, 0, 3]
    assert flat_indices(shape, None, torch.empty(0, dtype=torch.int32), 12, 0).tolist() == list(range(12))


def test_bad_mask_requests_raise():
    with pytest.raises(ValueError, match="k=13"):
        discrete_mask((3, 4), 13, 0)
    with pytest.raises(ValueError, match="mask"):
        build_mask((3, 4), "checkerboard", 3, 0, 0)
    with pytest.raises(ValueError, match="all its entries"):
        build_mask((3, 4), None, 3, 0, 0)


def test_masks_are_identical_across_processes():
    """The whole index lists (not a sum of them, which other masks share) are equal in a fresh process, whose string
    hashing is salted differently (PYTHONHASHSEED differs)."""
    code = (
        "import json; from peft_apet.masks import discrete_mask, adjacent_mask, stable_seed;"
        "s = stable_seed(0, 'encoder.layer.0.attention.self.query', 'delta');"
        "print(json.dumps([s, discrete_mask((300, 200), 777, s).tolist(),"
        " adjacent_mask((300, 200), 777, 1, s).tolist()]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=300).stdout
    seed_there, discrete_there, adjacent_there = json.loads(out)
    seed = stable_seed(0, "encoder.layer.0.attention.self.query", "delta")
    assert seed_there == seed
    assert discrete_there == discrete_mask((300, 200), 777, seed).tolist()
    assert adjacent_there == adjacent_mask((300, 200), 777, 1, seed).tolist()
    # ... and the seed depends on the module name, so other modules get other masks.
    other = stable_seed(0, "encoder.layer.1.attention.self.query", "delta")
    assert discrete_mask((300, 200), 777, other).tolist() != discrete_there
