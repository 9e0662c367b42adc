"""Smoke test of `python -m benchmarks.adapter_size`: two points on BERT-base (shapes only, no weights), checked for
what the script claims: every value and index reloads exactly (inside the script), the file is at least the entropy
bound, and the packed file is smaller than 0.1's per-module one."""

from __future__ import annotations

import json

from benchmarks import adapter_size


def test_smoke_run_reports_sizes_against_the_bound(tmp_path):
    assert adapter_size.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["mask"], r["k"]) for r in rows] == [("discrete", 1_000), ("adjacent", 10_000)]
    for row in rows:
        assert row["tensors"] == 24  # query and value of 12 layers
        assert row["bound_B_per_param"] <= row["payload_B_per_param"] < row["B_per_param"]
        assert row["B_per_param"] < row["per_module_0_1_B_per_param"]
    assert rows[1]["met"] and rows[1]["B_per_param"] <= 4.1
