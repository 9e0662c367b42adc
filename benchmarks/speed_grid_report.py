"""The analysis and report of `benchmarks.speed_grid`: per grid point, medians and ratios per method, issue 14's
targets (met or missed, by how much), `results.md` and the `summary`/`targets` of `results.json`; and the comparison of
two runs of the grid point by point:

    python -m benchmarks.speed_grid_report --compare OLD_FOLDER NEW_FOLDER   # writes NEW_FOLDER/comparison.md

Every ratio is taken within one grid point (one run of interleaved rounds; LoRA and SHiRA records may be shared
with an earlier point of the same ranks, see `speed_grid.shared_record`). A method's overhead is its median step
time less the floor's (the frozen backbone with one trainable bias), measured at the reference point of the same
model and tokens. Peak memory is the CPU RSS
peak (or CUDA `max_memory_allocated`) over the RSS (allocation) before injection, in MiB; "saved MiB" is what
autograd kept for backward in a method's first step (distinct non-parameter storages; points run before it was
recorded show "–").
"""

from __future__ import annotations

import argparse
import json
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


# Rows of the per-group table: label, and the name of the target of `targets` whose checks the row shows.
_RANGES = (("APET discrete / PEFT LoRA (target ≤ 1.0)", "discrete step / LoRA <= 1.0"),
           ("APET adjacent / PEFT LoRA (target ≤ 1.0)", "adjacent step / LoRA <= 1.0"),
           ("APET discrete / SHiRA (target ≤ 0.85)", "discrete step / SHiRA <= 0.85"),
           ("adjacent / discrete (target ≤ 1.0)", "adjacent step / discrete <= 1.0"),
           ("peak memory, discrete / SHiRA (target < 1)", "discrete peak / SHiRA's < 1"),
           ("peak memory, discrete / SpaRTA (target < 1)", "discrete peak / SpaRTA's < 1"),
           ("peak memory, adjacent / SHiRA (target < 1)", "adjacent peak / SHiRA's < 1"),
           ("peak memory, adjacent / SpaRTA (target < 1)", "adjacent peak / SpaRTA's < 1"))


def _label(point: dict) -> str:
    density = point["density"]
    fractions = {1 / 64: "1/64", 1 / 8: "1/8"}
    name = next((f for d, f in fractions.items() if abs(density - d) < 1e-12), f"{density:.0e}".replace("e-0", "e-"))
    return f"{point['targets']} {name}"


def group_ranges(summary: dict[str, dict], runs: dict[str, dict], checks: list[dict]) -> list[str]:
    """Markdown table, one column per (model, tokens): per target of `_RANGES` the range of its `checks` (as `targets`
    returns them) where it is met, and each miss with its point; then the floor's step and full fine-tuning's ratio
    to it."""
    groups: dict[str, list[str]] = {}
    for key, run in runs.items():
        p = run["point"]
        groups.setdefault(f"{p['model']}, {p['batch'] * p['seq']:,} tokens", []).append(key)
    lines = ["| at equal k per layer | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for label, target in _RANGES:
        cells = []
        for keys in groups.values():
            values = [t for t in checks if t["target"] == target and t["point"] in keys]
            met = [t["value"] for t in values if t["met"]]
            missed = [(t["value"], runs[t["point"]]["point"]) for t in values if not t["met"]]
            low, high = (f"{min(met):.2f}", f"{max(met):.2f}") if met else ("", "")
            span = low if low == high else f"{low}-{high}"
            cell = f"{span} at {len(met)} of {len(values)}" if met else f"none of {len(values)} met"
            if missed:
                cell += "; **" + ", ".join(f"{v:.2f}" for v, _ in missed) + "** (" + ", ".join(
                    _label(q) for _, q in missed) + ")"
            cells.append(cell if values else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floor_cells = []
    for keys in groups.values():
        ref = next((summary[k] for k in keys if runs[k]["point"]["targets"] is None), {})
        floor, full = ref.get("floor", {}).get("step_ms"), ref.get("full", {}).get("step_ms")
        floor_cells.append(f"{floor / 1e3:.1f}; {full / floor:.2f}" if floor and full else
                           f"{floor / 1e3:.1f}; –" if floor else "–")
    lines.append("| floor step (s); full fine-tuning / floor | " + " | ".join(floor_cells) + " |")
    return lines


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
    lines += ["## Ranges per model and token count", "",
              "Per quantity and group: the range over the points where the target is met, then each miss (bold) "
              "and its point.", "", *group_ranges(summary, runs, checks), "",
              "## Targets", "", f"{met} of {len(checks)} target checks met.", ""]
    (out / "results.md").write_text("\n".join(lines))


_COMPARED = (("disc/LoRA", "apet-discrete", "vs_lora", ".2f"), ("adj/LoRA", "apet-adjacent", "vs_lora", ".2f"),
             ("disc/SHiRA", "apet-discrete", "step_vs_shira", ".2f"),
             ("disc overhead (ms)", "apet-discrete", "overhead_ms", ".0f"),
             ("LoRA overhead (ms)", "peft-lora", "overhead_ms", ".0f"),
             ("disc peak / SHiRA's", "apet-discrete", "peak_vs_shira", ".2f"))


def compare(old: dict, new: dict, old_name: str, new_name: str) -> str:
    """Markdown: per grid point present in both `results.json` contents (`old`, `new`, as `write_report` leaves them),
    each quantity of `_COMPARED` in the old and the new run, the discrete delta's routes in the new one, and each
    run's count of targets met over those points."""
    lines = [f"# Speed grid: {new_name} against {old_name}", "",
             f"Per point: old → new (old: `{old.get('meta', {}).get('command', '?')}` of "
             f"{old.get('meta', {}).get('date', '?')}; new: `{new.get('meta', {}).get('command', '?')}` of "
             f"{new.get('meta', {}).get('date', '?')}). Ratios are within each run's point.", "",
             "| point | " + " | ".join(name for name, *_ in _COMPARED) + " | discrete routes (new) |",
             "|---|" + "---|" * (len(_COMPARED) + 1)]
    keys = [k for k in new.get("summary", {}) if k in old.get("summary", {})
            and new["runs"][k]["point"]["targets"] is not None]
    for key in keys:
        cells = []
        for _, method, field, fmt in _COMPARED:
            a, b = (run["summary"][key].get(method, {}).get(field) for run in (old, new))
            cells.append(f"{_f(a, fmt)} → {_f(b, fmt)}")
        routes = new["summary"][key].get("apet-discrete", {}).get("routes", {})
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {_routes(routes)} |")
    met = [sum(t["met"] for t in run.get("targets", []) if t["point"] in keys) for run in (old, new)]
    total = [sum(1 for t in run.get("targets", []) if t["point"] in keys) for run in (old, new)]
    lines += ["", f"Targets met over these {len(keys)} points: {met[0]} of {total[0]} ({old_name}), {met[1]} of "
              f"{total[1]} ({new_name})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare two runs of the speed grid point by point.")
    parser.add_argument("--compare", nargs=2, metavar=("OLD_FOLDER", "NEW_FOLDER"), required=True,
                        help="results folders of `python -m benchmarks.speed_grid` (each with results.json)")
    args = parser.parse_args(argv)
    old_dir, new_dir = (Path(f) for f in args.compare)
    old, new = (json.loads((d / "results.json").read_text()) for d in (old_dir, new_dir))
    (new_dir / "comparison.md").write_text(compare(old, new, old_dir.name, new_dir.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
