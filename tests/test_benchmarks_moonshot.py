"""Smoke test of `python -m benchmarks.moonshot`: every method on a tiny random BERT (two budgets, two seeds, one
epoch of 48 examples), the lr pick, the records' exact counts, the report, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import skip_without_smoke_data


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    skip_without_smoke_data("peft_sparta", "matplotlib")
    from benchmarks import moonshot

    out = tmp_path_factory.mktemp("moonshot_smoke")
    assert moonshot.main(["--smoke", "--out", str(out), "--task", "rotten_tomatoes"]) == 0
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_every_method_picks_an_lr_then_runs_the_other_seed(smoke):
    from benchmarks.moonshot import GRIDS, MODES

    records = _records(smoke)
    mode = MODES["smoke"]
    for method in GRIDS:
        for budget in (0,) if method == "full" else mode.budgets:
            runs = [r for r in records if (r["method"], r["budget"]) == (method, budget)]
            assert set(GRIDS[method]) <= {r["lr"] for r in runs if r["seed"] == 0}
            assert len([r for r in runs if r["seed"] == 1]) == 1
            assert all(r["steps"] == 48 // 8 and r["epochs"] == 1 for r in runs)
    assert {r["budget"] for r in records if r["method"] == "apet"} == {*mode.budgets, *mode.sweep_budgets}


def test_trainable_counts_are_what_the_records_say(smoke):
    from benchmarks import harness
    from benchmarks.moonshot import MODES, RunSpec, build, counts

    mode = MODES["smoke"]
    task = harness.load_model_task(mode.model, "rotten_tomatoes", max_len=mode.max_len, test_size=mode.test_size,
                                   subset=mode.subset)
    checked = set()
    for r in _records(smoke):
        if (r["method"], r["budget"], r["seed"]) in checked:
            continue
        checked.add((r["method"], r["budget"], r["seed"]))
        torch.manual_seed(r["seed"])
        _, named = build(RunSpec(r["task"], r["method"], r["budget"], r["lr"], r["seed"]), task)
        assert counts(named) == (r["k"], r["trainable_head"]), r["key"]
        if r["method"] == "apet":
            assert r["k"] == r["budget"]
    assert {m for m, _, _ in checked} == {"apet", "lora", "sparta", "full"}


def test_lora_ranks_reach_the_nearest_count():
    from torch import nn

    from benchmarks.equal_k import lora_ranks

    layers = [(f"layer.{i}.{kind}", nn.Linear(*shape)) for i in range(6) for kind, shape in
              (("attention.self.query", (384, 384)), ("attention.self.key", (384, 384)),
               ("attention.self.value", (384, 384)), ("attention.output.dense", (384, 384)),
               ("intermediate.dense", (384, 1536)), ("output.dense", (1536, 384)))]
    size = {n: m.in_features + m.out_features for n, m in layers}
    for k, expected in ((22_700, 22_656), (2_270, 2_304), (100, 768), (100_000, 99_840)):
        ranks = lora_ranks(layers, k)
        assert sum(r * size[n] for n, r in ranks.items()) == expected and min(ranks.values()) >= 1


def test_report_states_every_group_and_resumes(smoke):
    from benchmarks import moonshot

    results = json.loads((smoke / "results.json").read_text())
    assert {(r["method"], r["budget"]) for r in results["summary"]} >= {("full", 0), ("lora", 500), ("sparta", 100)}
    for row in results["summary"]:
        assert row["picked_lr"] == max(sorted(map(float, row["validation_by_lr"])),
                                       key=lambda lr: row["validation_by_lr"][f"{lr:g}"])
    text = (smoke / "results.md").read_text()
    assert "`python -m benchmarks.moonshot --smoke --out" in text and "| rotten_tomatoes | 500 | lora |" in text
    assert (smoke / "lr_curves.png").exists()
    before = (smoke / "runs.jsonl").read_text()
    assert moonshot.main(["--smoke", "--out", str(smoke), "--task", "rotten_tomatoes"]) == 0
    assert (smoke / "runs.jsonl").read_text() == before


def test_data_driven_masks_are_calibrated_over_all_layers():
    """`--mask-strategy sam`: exactly k entries, placed by calibration (not the seeded random draw)."""
    skip_without_smoke_data("peft_sparta")
    from benchmarks import harness
    from benchmarks.moonshot import MODES, RunSpec, build, counts

    mode = MODES["smoke"]
    task = harness.load_model_task(mode.model, "rotten_tomatoes", max_len=mode.max_len, test_size=mode.test_size,
                                   subset=mode.subset)

    def positions(strategy: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, named = build(RunSpec("rotten_tomatoes", "apet", 300, 1e-2, 0, strategy=strategy), task, 8)
        assert counts(named)[0] == 300
        return {n: b.clone() for n, b in model.named_buffers() if ".apet_weights." in n}

    sam, random = positions("sam"), positions("random")
    assert sam.keys() == random.keys() and any(not torch.equal(sam[n], random[n]) for n in sam)
    again = positions("sam")  # the same calibration batches for the same seed
    assert again.keys() == sam.keys() and all(torch.equal(again[n], sam[n]) for n in sam)


def test_targets_have_a_line_per_mask_strategy():
    from benchmarks.moonshot_report import target_lines, targets

    def row(method, budget, strategy, mean, val):
        return {"task": "t", "method": method, "budget": budget, "strategy": strategy, "epochs": 1,
                "picked_lr": 0.09, "validation_by_lr": {"0.09": val}, "test_mean": mean, "seeds": [0, 1, 2]}

    found = targets([row("apet", 2_270, "random", 0.742, 0.722), row("apet", 2_270, "sam", 0.756, 0.754),
                     row("full", 0, "random", 0.784, 0.826)], seeds=3)
    assert [(t["strategy"], t["met"], round(t["gap_points"], 1)) for t in found] == [("random", False, -4.2),
                                                                                     ("sam", True, -2.8)]
    text = target_lines(found)
    assert "k = 2,270, 1 epoch" in text and "k = 2,270 (sam masks)" in text and "validation 75.4 %" in text
