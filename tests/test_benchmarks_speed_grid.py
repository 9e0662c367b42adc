"""Smoke test of `python -m benchmarks.speed_grid`: tiny random models, three grid points, one measured step.

Checks what the benchmark claims about its runs, never timings: every method of every point ran and trains the
count it was asked for (APET exactly the plan's k, LoRA/SHiRA r * (in + out) per layer, the floor one bias), LoRA
and SHiRA are measured once per set of ranks, the report has a row per point and method, its ratios and overheads
follow from the records, and a rerun resumes.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from benchmarks import harness, speed_grid


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speed_grid_smoke")
    assert speed_grid.main(["--smoke", "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def results(smoke) -> dict:
    return json.loads((smoke / "results.json").read_text())


def test_every_point_ran_every_method(results):
    sparta = speed_grid._has_sparta()
    assert list(results["runs"]) == [p.key for p in speed_grid.MODES["smoke"].points]
    for key, run in results["runs"].items():
        point = speed_grid.Point(**run["point"])
        methods = [r["method"] for r in run["records"]]
        assert methods == speed_grid.methods_of(point, sparta), key
        for r in run["records"]:
            assert "error" not in r, (key, r)
            assert len(r["step_s"]) == 1 and r["step_s"][0] > 0 and r["peak_delta"] is not None
            assert r["saved_for_backward"] > 0  # every method's backward runs through every layer


def test_each_model_and_token_count_ran_in_a_child_process_of_its_own(smoke, results):
    log = (smoke / "run.log").read_text()
    groups = list(dict.fromkeys(speed_grid._group(p) for p in speed_grid.MODES["smoke"].points))
    assert len(groups) == 2
    for group in groups:
        assert log.count(f"{group}: child process done") == 1
    assert log.count("(child process)") == len(groups)
    assert [line.split("] ")[1].split(":")[0] for line in log.splitlines() if "warm-up floor step" in line] == groups
    command = results["meta"]["command"]
    assert "--only" not in command and all(run["command"] == command for run in results["runs"].values())


def test_trainable_counts_follow_the_plan(results):
    for run in results["runs"].values():
        point = speed_grid.Point(**run["point"])
        spec = speed_grid.MODELS[point.model]
        by = {r["method"]: r for r in run["records"]}
        if point.targets is None:
            assert by["floor"]["trainable"] == spec.config["hidden_size"]  # one bias of the first layer
            assert by["full"]["trainable"] > by["floor"]["trainable"]
            continue
        layers = run["layers"]
        assert set(layers) == set(speed_grid.target_layers(spec, point.targets))
        k = sum(layer["k"] for layer in layers.values())
        assert by["apet-discrete"]["trainable"] == by["apet-adjacent"]["trainable"] == k
        lora_k = sum(layer["r"] * sum(layer["shape"]) for layer in layers.values())
        assert by["peft-lora"]["trainable"] == by["shira"]["trainable"] == lora_k
        for layer in layers.values():
            o, i = layer["shape"]
            assert layer["k"] == max(1, round(point.density * o * i))
            assert layer["r"] == max(1, round(layer["k"] / (o + i)))
        assert by["apet-discrete"]["routes"] and by["apet-adjacent"]["routes"] == {"adjacent": len(layers)}
        if "sparta" in by:  # a Bernoulli sample of the same density
            assert 0 < by["sparta"]["trainable"] < 3 * k + 50


def test_report_ratios_follow_from_the_records(smoke, results):
    text = (smoke / "results.md").read_text()
    assert "## Summary per point" in text and "## Targets" in text
    floors = {run["point"]["model"]: statistics.median(run["records"][0]["step_s"])
              for run in results["runs"].values() if run["point"]["targets"] is None}
    for key, run in results["runs"].items():
        assert f"### {key}" in text
        median = {r["method"]: statistics.median(r["step_s"]) for r in run["records"]}
        rows = results["summary"][key]
        for method, row in rows.items():
            assert row["step_ms"] == pytest.approx(1e3 * median[method])
            if "peft-lora" in median:
                assert row["vs_lora"] == pytest.approx(median[method] / median["peft-lora"])
            assert row["overhead_ms"] == pytest.approx(1e3 * (median[method] - floors[run["point"]["model"]]))
    for target in results["targets"]:
        assert target["met"] == (target["value"] <= target["limit"])
    assert {t["point"] for t in results["targets"]} == {k for k, r in results["runs"].items() if r["layers"]}


def test_lora_and_shira_are_measured_once_per_set_of_ranks(smoke, results):
    runs = results["runs"]
    first, second = "tiny-llama/2x8/qv/d=0.015625", "tiny-llama/2x8/qv/d=0.001"
    assert {n: layer["r"] for n, layer in runs[first]["layers"].items()} == {
        n: layer["r"] for n, layer in runs[second]["layers"].items()}
    assert runs[first]["layers"] != runs[second]["layers"]  # APET's k differs
    log = (smoke / "run.log").read_text()
    for method in speed_grid.RANK_METHODS:
        measured = next(r for r in runs[first]["records"] if r["method"] == method)
        reused = next(r for r in runs[second]["records"] if r["method"] == method)
        assert "shared_from" not in measured and reused == {**measured, "shared_from": first}
        assert f"{second} {method}: same ranks as {first}, its record reused" in log
        assert f"{method} (shared with {first})" in (smoke / "results.md").read_text()
    apet = [r for run in runs.values() for r in run["records"] if r["method"].startswith("apet-")]
    assert apet and all("shared_from" not in r for r in apet)  # measured at every point


def test_a_rerun_skips_finished_points(smoke, results):
    assert speed_grid.main(["--smoke", "--out", str(smoke), "--threads", "1"]) == 0
    again = json.loads((smoke / "results.json").read_text())
    assert again["runs"] == results["runs"]
    assert (smoke / "run.log").read_text().count("done before, skipped") == len(results["runs"])


def test_full_fine_tuning_runs_where_the_floors_step_plus_its_optimizer_state_fits():
    free = harness.available_memory("cpu")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < free <= total
    params = 1000
    assert harness.full_ft_fits(params, "cpu", floor_peak=free // 2)[0]
    fits, why = harness.full_ft_fits(params, "cpu", floor_peak=free - 6 * params)  # + 12 B/param: too much
    assert not fits and why.startswith("needs ~") and why.endswith("GiB available")
    assert not harness.full_ft_fits(free // 16, "cpu", floor_peak=None)[0]  # 16 B/param + 2 GiB


def test_two_runs_compare_point_by_point(smoke, results, tmp_path):
    """`speed_grid_report --compare OLD NEW`: a row per compared point with old → new values from each run's summary
    (here a copy of the run with the discrete delta's ratio to LoRA halved), and each run's targets met."""
    from benchmarks import speed_grid_report

    new = json.loads(json.dumps(results))
    compared = [k for k, r in new["runs"].items() if r["point"]["targets"] is not None]
    for key in compared:
        new["summary"][key]["apet-discrete"]["vs_lora"] /= 2
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "results.json").write_text(json.dumps(new))
    assert speed_grid_report.main(["--compare", str(smoke), str(tmp_path / "new")]) == 0
    text = (tmp_path / "new" / "comparison.md").read_text()
    for key in compared:
        old = results["summary"][key]["apet-discrete"]["vs_lora"]
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {key} |")]
        assert row.split(" | ")[1] == f"{old:.2f} → {old / 2:.2f}"
    met = sum(t["met"] for t in results["targets"] if t["point"] in compared)
    assert f"{met} of {sum(t['point'] in compared for t in results['targets'])}" in text


def test_the_ranges_table_counts_every_point_of_each_group(smoke, results):
    """results.md's table per (model, tokens): for each quantity, the points where its target is met (as `targets`
    counts them) and each miss with its value, over all of the group's grid points."""
    from benchmarks.speed_grid_report import _RANGES

    text = (smoke / "results.md").read_text()
    table = text.split("## Ranges per model and token count")[1].split("## Targets")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| at equal")}
    groups = {}
    for key, run in results["runs"].items():
        p = run["point"]
        if p["targets"] is not None:
            groups.setdefault((p["model"], p["batch"] * p["seq"]), []).append(key)
    limits = {"discrete step / SHiRA <= 0.85": 0.85}  # every other target of the table has limit 1
    fields = {"step / LoRA": "vs_lora", "step / SHiRA": "step_vs_shira", "step / discrete": "vs_discrete",
              "peak / SHiRA's": "peak_vs_shira", "peak / SpaRTA's": "peak_vs_sparta"}
    for label, target in _RANGES:
        method = "apet-" + target.split()[0]
        field = next(f for what, f in fields.items() if what in target)
        limit = limits.get(target, 1.0)
        for cell, keys in zip(rows[label], groups.values()):
            values = [results["summary"][k][method][field] for k in keys
                      if field in results["summary"][k].get(method, {})]
            met = sum(v <= limit for v in values)
            assert (f"at {met} of {len(values)}" if met else f"none of {len(values)} met") in cell
            for v in values:
                if v > limit:
                    assert f"{v:.2f}" in cell.split("**")[1]
