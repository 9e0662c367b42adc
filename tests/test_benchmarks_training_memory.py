"""Smoke test of `python -m benchmarks.training_memory`: tiny random BERT, one budget, every method in-process.

Checks what the records claim, never sizes that depend on the allocator: every method ran and trains what it should
(APET exactly k; the head alone nothing else), its trainable state follows from its trainable count, APET's index
arrays are counted, and the report has a row per method and APET's difference to SpaRTA."""

from __future__ import annotations

import json

import pytest

from benchmarks import training_memory


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("training_memory_smoke")
    assert training_memory.main(["--smoke", "--out", str(out)]) == 0
    return out


def test_every_method_ran_and_trains_its_count(smoke):
    records = json.loads((smoke / "results.json").read_text())["records"]
    (k,) = training_memory.BUDGETS["smoke"]
    by = {r["method"]: r for r in records}
    assert list(by) == list(training_memory.METHODS)
    assert by["apet-discrete"]["k"] == by["apet-adjacent"]["k"] == k
    assert by["head"]["k"] == 0 and by["full"]["k"] > by["sparta"]["k"] > 0
    for r in records:
        state = r["state"]
        assert state["params"] == state["grads"] == 4 * r["trainable"]  # fp32
        assert state["optimizer"] >= 8 * r["trainable"]  # AdamW's two moments (plus its step counters)
        assert r["peak_rss"] >= r["rss_after_build"] and r["tokens_per_step"] > 0
        assert r["peak_tensor_bytes"] >= r["saved_for_backward"]  # what is saved is live at the end of the forward
        if r["method"] != "head":
            assert r["saved_for_backward"] > by["head"]["saved_for_backward"]
    assert by["apet-discrete"]["index_arrays"] > 0


def test_report_has_a_row_per_method(smoke):
    text = (smoke / "results.md").read_text()
    for method in training_memory.METHODS:
        assert f"| {method} |" in text
    assert "apet-discrete" in text.split("Peak minus SpaRTA's")[1]
