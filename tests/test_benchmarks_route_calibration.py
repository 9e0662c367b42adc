"""Smoke test of `python -m benchmarks.route_calibration`: two tiny shapes. Checks what the script claims, never
timings: every route was timed at every point (gathers below their work limit), the fitted constants are
non-negative and shaped as `routes.COSTS`, and every choice of the report is one of the routes timed there."""

from __future__ import annotations

import json

from benchmarks import route_calibration
from peft_apet import routes


def test_smoke_run_times_every_route_and_fits_every_constant(tmp_path):
    assert route_calibration.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    constants = json.loads((tmp_path / "constants.json").read_text())["costs"]
    grid = route_calibration.SMOKE
    assert len(results["records"]) == len(grid["shapes"]) * len(grid["tokens"]) * len(grid["densities"])
    for rec in results["records"]:
        assert all(s is not None and s > 0 for s in rec["seconds"].values()), rec  # tiny: gathers are timed too
    assert {r: len(c) for r, c in constants.items()} == {r: len(c) for r, c in routes.COSTS.items()}
    assert all(c >= 0 for cs in constants.values() for c in cs)
    assert len(results["choices"]) == 3 * len(results["records"])
    for row in results["choices"]:
        assert row["picked_s"] > 0 and row["over_fastest"] >= 1, row
    assert (tmp_path / "results.md").read_text().startswith("# Route calibration")
