"""The analysis and report of `benchmarks.speed_grid`: per grid point, medians and ratios per method, issue 14's
targets (met or missed, by how much), `results.md` and the `summary`/`targets` of `results.json`.

Every ratio is taken within one grid point (one run of interleaved rounds; LoRA and SHiRA records may be shared
with an earlier point of the same ranks, see `speed_grid.shared_record`). A method's overhead is its median step
time less the floor's (the frozen backbone with one trainable bias), measured at the reference point of the same
model and tokens. Peak memory is the CPU RSS
peak (or CUDA `max_memory_allocated`) over the RSS (allocation) before injection, in MiB; "saved MiB" is what
autograd kept for backward in a method's first step (distinct non-parameter storages; points run before it was
recorded show "–").
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import harness

APET = ("apet-discrete", "apet-adjacent")


def _median_step_ms(records: list[dict]) -> float:
    return 1e3 * statistics.median([s for r in records for s in r["step_s"]])


def reference_floors(runs: dict[str, dict]) -> dict[tuple, float]:
    """`{(model, batch, seq): floor's median step (ms)}` from the reference points of `runs`."""
    floors = {}
    for run in runs.values():
        p = run["point"]
        ok = [r for r in run["records"] if r["method"] == "floor" and "error" not in r]
        if p["targets"] is None and ok:
            floors[p["model"], p["batch"], p["seq"]] = _median_step_ms(ok)
    return floors


def summarise(run: dict, floor_ms: float | None) -> dict[str, dict]:
    """`{method: row}` of one point: median step (ms), exact trainable count, peak (MiB), ratios to LoRA, overheads
    over `floor_ms` (the reference floor's median step of the same model and tokens; None: no overheads)."""
    rows: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in run["records"]):
        recs = [r for r in run["records"] if r["method"] == method]
        ok = [r for r in recs if "error" not in r]
        if not ok:
            rows[method] = {"method": method, "error": recs[0]["error"]}
            continue
        peak_key = "cuda_peak_delta" if "cuda_peak_delta" in ok[0] else "peak_delta"
        rows[method] = {"method": method, "trainable": ok[0]["trainable"],
                        "step_ms": _median_step_ms(ok), "shared_from": ok[0].get("shared_from"),
                        "steps_measured": sum(len(r["step_s"]) for r in ok),
                        "peak_mib": statistics.median([r[peak_key] for r in ok]) / 2**20,
                        "saved_mib": (ok[0]["saved_for_backward"] / 2**20 if "saved_for_backward" in ok[0]
                                      else None),
                        "routes": ok[0].get("routes", {})}
    ok_rows = {m: r for m, r in rows.items() if "error" not in r}
    lora = ok_rows.get("peft-lora")
    for row in ok_rows.values():
        if lora:
            row["vs_lora"] = row["step_ms"] / lora["step_ms"]
        if floor_ms is not None:
            row["overhead_ms"] = row["step_ms"] - floor_ms
    for name in ("shira", "sparta"):
        other = ok_rows.get(name)
        for method in APET:
            if other and method in ok_rows:
                ok_rows[method][f"step_vs_{name}"] = ok_rows[method]["step_ms"] / other["step_ms"]
                ok_rows[method][f"peak_vs_{name}"] = ok_rows[method]["peak_mib"] / other["peak_mib"]
    if "apet-adjacent" in ok_rows and "apet-discrete" in ok_rows:
        ok_rows["apet-adjacent"]["vs_discrete"] = (ok_rows["apet-adjacent"]["step_ms"]
                                                   / ok_rows["apet-discrete"]["step_ms"])
    return rows


def targets(key: str, rows: dict[str, dict]) -> list[dict]:
    """Issue 14's targets at one point: each a value, an upper limit and whether it was met."""
    out = []

    def check(what: str, value: float | None, limit: float) -> None:
        if value is not None:
            out.append({"point": key, "target": what, "value": value, "limit": limit, "met": value <= limit})

    lora = rows.get("peft-lora", {})
    for method in APET:
        row = rows.get(method, {})
        name = method.removeprefix("apet-")
        check(f"{name} step / LoRA <= 1.0", row.get("vs_lora"), 1.0)
        check(f"{name} step / SHiRA <= 0.85", row.get("step_vs_shira"), 0.85)
        if "overhead_ms" in row and "overhead_ms" in lora:
            check(f"{name} overhead over floor - LoRA's <= 0 (ms)", row["overhead_ms"] - lora["overhead_ms"], 0.0)
        check(f"{name} peak / SHiRA's < 1", row.get("peak_vs_shira"), 1.0)
        check(f"{name} peak / SpaRTA's < 1", row.get("peak_vs_sparta"), 1.0)
    check("adjacent step / discrete <= 1.0", rows.get("apet-adjacent", {}).get("vs_discrete"), 1.0)
    return out


def _f(value, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _routes(routes: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(routes.items())) or "–"


def write_report(out: Path, saved: dict) -> None:
    """`results.md` and the summary/targets in `results.json` from the stored runs (`saved["runs"]`)."""
    runs = saved.get("runs", {})
    floors = reference_floors(runs)
    summary = {key: summarise(run, floors.get((run["point"]["model"], run["point"]["batch"], run["point"]["seq"])))
               for key, run in runs.items()}
    checks = [t for key, rows in summary.items() for t in targets(key, rows)]
    saved["summary"], saved["targets"] = summary, checks
    harness.write_json(out / "results.json", saved, end="\n")
    meta = saved.get("meta", {})
    lines = ["# Speed grid: step time and peak memory at realistic shapes (issue 14)", "",
             f"Written {harness.now()} from runs of `{meta.get('command', '?')}` ({meta.get('device', 'cpu')}"
             f"{', bf16 autocast' if meta.get('bf16') else ''}; {meta.get('rounds')} round(s) x "
             f"({meta.get('warmup')} warm-up + {meta.get('measured')} measured) steps per method, after one untimed "
             f"floor step per model and token count; machine: "
             f"{meta.get('machine', {}).get('cpu', '?')}, torch threads {meta.get('machine', {}).get('torch_threads')}"
             f"). {len(runs)} points. Ratios are of median step times within one point.", "",
             "## Summary per point", "",
             "| point | disc/LoRA | adj/LoRA | SHiRA/LoRA | SpaRTA/LoRA | disc/SHiRA | adj/disc | overhead "
             "disc, adj, LoRA (ms) | peak disc, adj / SHiRA | peak disc, adj / SpaRTA | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in summary.items():
        if runs[key]["point"]["targets"] is None:
            continue
        r = {m: rows.get(m, {}) for m in ("apet-discrete", "apet-adjacent", "peft-lora", "shira", "sparta")}
        d, a = r["apet-discrete"], r["apet-adjacent"]
        met = [t for t in checks if t["point"] == key]
        lines.append(
            f"| {key} | {_f(d.get('vs_lora'))} | {_f(a.get('vs_lora'))} | {_f(r['shira'].get('vs_lora'))} | "
            f"{_f(r['sparta'].get('vs_lora'))} | {_f(d.get('step_vs_shira'))} | {_f(a.get('vs_discrete'))} | "
            f"{_f(d.get('overhead_ms'), '.0f')}, {_f(a.get('overhead_ms'), '.0f')}, "
            f"{_f(r['peft-lora'].get('overhead_ms'), '.0f')} | {_f(d.get('peak_vs_shira'))}, "
            f"{_f(a.get('peak_vs_shira'))} | {_f(d.get('peak_vs_sparta'))}, {_f(a.get('peak_vs_sparta'))} | "
            f"{sum(t['met'] for t in met)}/{len(met)} |")
    lines += ["", "## Points in detail", ""]
    for key, rows in summary.items():
        run = runs[key]
        lines += [f"### {key}", "", *[f"- {n}" for n in run.get("notes", [])],
                  f"- wall time {run.get('wall_s', 0):.0f} s, finished {run.get('date', '?')}"
                  + (f", glibc mmap threshold fixed at {run['mmap_threshold']} B" if run.get("mmap_threshold") else "")
                  + (f"; command `{run['command']}`" if run.get("command") else ""), "",
                  "| method | trainable | step ms | x LoRA | overhead over floor (ms) | peak MiB | saved MiB | APET "
                  "routes per step |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows.values():
            if "error" in row:
                lines.append(f"| {row['method']} | FAILED: {row['error'][:120]} | | | | | | |")
                continue
            shared = f" (shared with {row['shared_from']})" if row.get("shared_from") else ""
            lines.append(f"| {row['method']}{shared} | {row['trainable']:,} | {row['step_ms']:.0f} | "
                         f"{_f(row.get('vs_lora'))}"
                         f" | {_f(row.get('overhead_ms'), '.0f')} | {row['peak_mib']:.0f} | "
                         f"{_f(row.get('saved_mib'), '.0f')} | {_routes(row['routes'])} |")
        missed = [t for t in checks if t["point"] == key and not t["met"]]
        if missed:
            lines += ["", "Missed: " + "; ".join(f"{t['target']}: {t['value']:.2f}" for t in missed)]
        lines.append("")
    met = sum(t["met"] for t in checks)
    lines += ["## Targets", "", f"{met} of {len(checks)} target checks met.", ""]
    (out / "results.md").write_text("\n".join(lines))
