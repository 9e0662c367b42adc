"""Smoke test of `python -m benchmarks.cost`: the whole cost benchmark on tiny random models (two budgets, two steps).

Checks what the benchmark claims about its runs, never timings: the output files exist, every method trains the
count it was asked for (APET adjacent/discrete exactly k, LoRA/SHiRA r * sum(m + n) over the targets), the
trainable state is read from the real tensors, and the report has a row per method.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from benchmarks import cost


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cost_smoke")
    assert cost.main(["--smoke", "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def results(smoke) -> dict:
    return json.loads((smoke / "results.json").read_text())


def test_output_files(smoke):
    for name in ("results.json", "results.csv", "results.md"):
        assert (smoke / name).stat().st_size > 0
    pytest.importorskip("matplotlib")
    assert (smoke / "step_ratio_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_method_failed_and_every_record_has_its_measurements(results):
    records = [r for run in results["runs"] for r in run["records"]]
    assert records
    for r in records:
        assert "error" not in r, (r["model"], r["method"], r.get("error"))
        assert len(r["step_s"]) == 1 and len(r["warmup_step_s"]) == 1  # smoke: one warm-up, one measured step
        assert r["step_s"][0] > 0 and r["warmup_step_s"][0] > 0
        if r["family"] != "full":
            assert r["file_bytes"] > r["payload_bytes"] > 0


def test_trainable_counts_are_what_was_asked(results):
    runs = {(run["what"], run["model"]): run for run in results["runs"]}
    assert set(runs) == {("grid", "tiny-bert"), ("grid", "tiny-llama"), ("memory", "tiny-llama")}
    for (what, model), run in runs.items():
        spec = cost.MODELS[model]
        per_rank = sum(o + i for o, i in cost.linear_shapes(spec))
        by_method = {r["method"]: r for r in run["records"]}
        assert by_method[cost.REFERENCE]["trainable"] == 8 * per_rank
        sparse = [r for r in run["records"] if r["family"] in ("apet-discrete", "apet-adjacent")]
        assert {r["family"] for r in sparse} == {"apet-discrete", "apet-adjacent"}
        for r in sparse:
            assert r["trainable"] == r["k"], r["method"]
            # values, gradients and two AdamW moments in fp32, plus one fp32 step counter per values tensor
            state = r["state_bytes"]
            assert state["total"] == 16 * r["k"] + 4 * state["param_tensors"], r["method"]
        for r in run["records"]:
            if r["family"] in ("shira", "peft-lora") and r["r"] is not None:
                assert r["trainable"] == r["r"] * per_rank, r["method"]
            if r["expected_trainable"] is not None:
                assert r["trainable"] == r["expected_trainable"], r["method"]
        ks = {r["k"] for r in sparse}
        if what == "grid":
            assert {100, 1000, per_rank} <= ks  # the two budgets and SHiRA's r=1 count
            assert {"apet-lora", "apet-adapter", "apet-bitfit", "apet-prompt", "peft-prompt", "full",
                    "shira@r=1"} <= set(by_method)
            assert by_method["apet-lora"]["trainable"] == by_method[cost.REFERENCE]["trainable"]
            assert by_method["apet-prompt"]["trainable"] == by_method["peft-prompt"]["trainable"] == 20 * spec.hidden
        else:
            assert ks == {per_rank} and by_method["shira@r=1"]["trainable"] == per_rank


def test_report_has_a_row_per_method_and_ratios_to_lora(smoke, results):
    text = (smoke / "results.md").read_text()
    for heading in ("## tiny-bert", "## tiny-llama", "## Mask construction", "## Targets",
                    "command: `python -m benchmarks.cost --smoke"):
        assert heading in text
    summary = [row for rows in results["summary"].values() for row in rows]
    with (smoke / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["model"], r["method"]) for r in csv_rows] == [(r["model"], r["method"]) for r in summary]
    # Every ratio is recomputed here from the records of its run: medians of the measured steps, over the reference
    # method's (PEFT LoRA) of the same run. The reference's own row is then 1 by construction, so it is not checked.
    for run in results["runs"]:
        key = f"{run['what']}:{run['model']}"
        steps: dict[str, list[float]] = {}
        for r in run["records"]:
            steps.setdefault(r["method"], []).extend(r["step_s"])
        median = {m: statistics.median(s) for m, s in steps.items()}
        rows = results["summary"][key]
        assert {row["method"] for row in rows} == set(steps)
        for row in rows:
            assert f"| {row['method']} |" in text
            assert row["step_ms"] == pytest.approx(1e3 * median[row["method"]], rel=1e-9)
            assert row["step_ratio"] == pytest.approx(median[row["method"]] / median["peft-lora"], rel=1e-9)
    # A target is met exactly when its value is within its limit (every target of cost.py is an upper bound; the
    # smoke's values are whatever the machine gives, the verdict must follow from them).
    assert results["targets"]
    for target in results["targets"]:
        assert target["met"] == (target["value"] <= target["limit"]), target
