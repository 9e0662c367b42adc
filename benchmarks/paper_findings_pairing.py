"""The pairing part of `benchmarks.paper_findings` (`--part pairing`, issue 16): tables and a Figure 6-style plot.

`pairing_report(out, command, records, plan)` writes `pairing.md`, `pairing.json` and `fig6_pairing_<model>_<task>.png`
from the finished runs of `plan["pairing_runs"]` (masked `lora` and `adapter` structures, both masks, independent
and aligned `mask_pairing`, equal budgets) and `<out>/learnable.json` (per run key: the entries that can receive
a gradient and the trainable entries, `learnable_entries()` of the run's adapter). The `delta` runs of the main
sweep at the same budgets and lr are shown beside them: in a one-matrix part every entry can learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.paper_findings_report import MASKS, Point, _group, _mean_curve, steps_to_fraction

PAIRINGS = ("independent", "aligned")
STRUCTURES = ("delta", "lora", "adapter")


def pairing_of(record: dict) -> str:
    """The `mask_pairing` of a run: records made before the pairing dimension existed were independent."""
    return record.get("pairing") or "independent"


def _share(members: list[dict], learnable: dict) -> float | None:
    """Mean share of the trainable entries that can learn over `members` (1 for delta; None if not counted)."""
    if members[0]["structure"] == "delta":
        return 1.0
    counts = [learnable[r["key"]] for r in members if r["key"] in learnable]
    return float(np.mean([c["learnable"] / c["trainable"] for c in counts])) if counts else None


def analyse_pairing(records: list[dict], plan: dict, learnable: dict) -> dict[tuple[str, str], list[dict]]:
    """Per (model, task): one row per (structure, mask, budget, pairing) with the test Point over seeds, the mean
    validation curve, the steps to 90 % of its gain and the learnable share. Delta rows: the runs of any part at
    the same model, task, budgets, lr, steps and seeds as the paired runs (pairing "—"); models and tasks without
    paired runs get no rows."""
    keys = set(plan.get("pairing_runs", []))
    paired = [r for r in records if r["key"] in keys]
    if not paired:
        return {}
    budgets, lrs = {r["budget"] for r in paired}, {r["lr"] for r in paired}
    steps = {r["steps"] for r in paired}
    settings = {(p["model"], p["task"], p["seed"]) for p in paired}
    delta = [r for r in records if r["method"] == "apet" and r["structure"] == "delta" and r["budget"] in budgets
             and r["lr"] in lrs and r["steps"] in steps and (r["model"], r["task"], r.get("seed")) in settings]
    out = {}
    for (model, task), rs in _group(paired + delta, "model", "task").items():
        rows = []
        for (structure, mask, budget), members in _group(rs, "structure", "mask", "budget").items():
            by_pairing = {"—": members} if structure == "delta" else \
                {p: [r for r in members if pairing_of(r) == p] for p in PAIRINGS}
            for pairing, group in by_pairing.items():
                if not group:
                    continue
                group = sorted(group, key=lambda r: r["seed"])
                curve = _mean_curve(group)
                rows.append({"structure": structure, "mask": mask, "budget": budget, "pairing": pairing,
                             "test": Point.of(group), "curve": curve,
                             "by_seed": {r["seed"]: r["test"]["accuracy"] for r in group},
                             "steps_to_90": steps_to_fraction(curve, curve[0][1]),
                             "learnable_share": _share(group, learnable)})
        rows.sort(key=lambda r: (r["budget"], STRUCTURES.index(r["structure"]), MASKS.index(r["mask"]),
                                 ("—", *PAIRINGS).index(r["pairing"])))
        out[(model, task)] = rows
    return out


def _find(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _by_seed(row: dict | None) -> str:
    return "—" if row is None else ", ".join(f"{100 * a:.1f}" for a in row["by_seed"].values())


def _diff(a: dict | None, b: dict | None) -> str:
    return "—" if a is None or b is None else f"{100 * (a['test'].mean - b['test'].mean):+.1f}"


def markdown(analysis: dict, plan: dict, meta: dict) -> str:
    """`pairing.md`: independent vs aligned at equal budgets, then the structure and mask comparisons per pairing."""
    planned = plan.get("pairing_runs", [])
    lines = ["# Paper findings 5 and 6 with both mask pairings (issue 16)", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- sweep command: `{plan.get('pairing_command') or '?'}`; this report: `{meta['command']}`",
             f"- pairing runs finished: {len(planned) - len(meta['pairing_missing'])} of {len(planned)} planned"
             + (" — **PARTIAL**" if meta["pairing_missing"] else ""), "",
             "Test accuracy in %: mean ± err (seeds); err is the std over seeds, or the binomial standard error "
             "for one seed. Learnable: share of the trainable entries that can receive a gradient "
             "(`learnable_entries()`, from `learnable.json`). Steps to 90 %: first validation-curve step with "
             "90 % of the curve's gain (curve every 25 steps on the validation subset).", ""]
    for (model, task), rows in analysis.items():
        lines += [f"## {model} on {task}", "", "### Independent vs aligned masks at equal budget", "",
                  "| structure | mask | budget | independent | aligned | aligned − independent | by seed 0, 1, … "
                  "(ind. / al.) | learnable (ind. / al.) | steps to 90 % (ind. / al.) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row["pairing"] != "independent":
                continue
            al = _find(rows, structure=row["structure"], mask=row["mask"], budget=row["budget"], pairing="aligned")
            lines.append(f"| {row['structure']} | {row['mask']} | {row['budget']:,} | {row['test']} | "
                         f"{al['test'] if al else 'missing'} | {_diff(al, row)} | {_by_seed(row)} / {_by_seed(al)} | "
                         f"{_pct(row['learnable_share'])} / "
                         f"{_pct(al and al['learnable_share'])} | {row['steps_to_90'] or '—'} / "
                         f"{(al and al['steps_to_90']) or '—'} |")
        lines += ["", "### Structures and masks at equal budget, per pairing (findings 5 and 6)", "",
                  "Delta has no pairing: its runs at the same budget, lr and steps (from any part of the sweep; seeds "
                  "as in the by-seed columns above) stand in both blocks; cells average the seeds.", "",
                  "| budget | pairing | " + " | ".join(f"{s} {m}" for s in STRUCTURES for m in MASKS) +
                  " | spread of the six | adjacent − discrete (delta / lora / adapter) |", "|---" * 10 + "|"]
        for budget in sorted({r["budget"] for r in rows}):
            for pairing in PAIRINGS:
                cells = {(s, m): _find(rows, structure=s, mask=m, budget=budget,
                                       pairing="—" if s == "delta" else pairing) for s in STRUCTURES for m in MASKS}
                means = [c["test"].mean for c in cells.values() if c]
                spread = f"{100 * (max(means) - min(means)):.1f}" if means else "—"
                gaps = " / ".join(_diff(cells[s, "adjacent"], cells[s, "discrete"]) for s in STRUCTURES)
                lines.append(f"| {budget:,} | {pairing} | " + " | ".join(
                    f"{100 * c['test'].mean:.1f}" if c else "" for c in cells.values()) + f" | {spread} | {gaps} |")
        lines += ["", "### Validation curves (Figure 6 style)", "",
                  "| structure | budget | mask | pairing | accuracy at steps … | steps to 90 % |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            points = " ".join(f"{s}:{100 * v:.0f}" for s, v in row["curve"])
            lines.append(f"| {row['structure']} | {row['budget']:,} | {row['mask']} | {row['pairing']} | {points} | "
                         f"{row['steps_to_90'] or '—'} |")
        lines.append("")
    if meta["pairing_missing"]:
        lines += ["## Missing pairing runs (planned, not finished)", ""] + \
                 [f"- `{k}`" for k in meta["pairing_missing"]] + [""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, stamp: str) -> Path:
    """Validation accuracy against steps: a row per two-matrix structure, a column per budget, a line per mask and
    pairing."""
    plt = harness.pyplot()
    structures = [s for s in STRUCTURES if s != "delta" and any(r["structure"] == s for r in rows)]
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(len(structures), len(budgets), figsize=(3.4 * len(budgets), 2.8 * len(structures)),
                             squeeze=False, sharey=True)
    for (i, structure), (j, budget) in [(s, b) for s in enumerate(structures) for b in enumerate(budgets)]:
        ax = axes[i][j]
        for row in [r for r in rows if (r["structure"], r["budget"]) == (structure, budget)]:
            curve = row["curve"]
            ax.plot([s for s, _ in curve], [100 * v for _, v in curve], marker=".",
                    color="tab:blue" if row["mask"] == "adjacent" else "tab:orange",
                    linestyle="-" if row["pairing"] == "aligned" else "--", label=f"{row['mask']}, {row['pairing']}")
        ax.set_title(f"{structure}, k = {budget:,}", fontsize=8)
        ax.set_xlabel("steps")
        ax.set_ylabel("validation accuracy (%)" if j == 0 else "")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return harness.save_figure(fig, path, stamp)


def pairing_report(out: Path, command: str, records: list[dict], plan: dict, meta: dict) -> list[Path]:
    """Write `pairing.md`, `pairing.json` and the plots when the plan has pairing runs; returns the PNGs written."""
    if not plan.get("pairing_runs"):
        return []
    learnable_path = out / "learnable.json"
    learnable = json.loads(learnable_path.read_text()) if learnable_path.exists() else {}
    analysis = analyse_pairing(records, plan, learnable)
    done = {r["key"] for r in records}
    meta = {**meta, "pairing_missing": [k for k in plan["pairing_runs"] if k not in done]}
    (out / "pairing.md").write_text(markdown(analysis, plan, meta))
    harness.write_json(out / "pairing.json", {
        "meta": meta, "rows": {"/".join(k): [{**r, "test": vars(r["test"])} for r in rows]
                               for k, rows in analysis.items()}})
    stamp = harness.stamp(meta["date"], command)
    return [plot(rows, out / f"fig6_pairing_{model}_{task}.png",
                 f"Figure 6 with both pairings — {model}, {task} (solid: aligned, dashed: independent)", stamp)
            for (model, task), rows in analysis.items()
            if any(r["structure"] != "delta" for r in rows)]  # a model with delta runs only has nothing to pair
