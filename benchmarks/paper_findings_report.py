"""The analysis and report of `benchmarks.paper_findings`: curves, thresholds, Figure 5-7 tables and plots.

`report(out, command)` rebuilds `results.md`, `runs.csv`, `summary.json` and the PNGs from the run records in
`<out>/runs/` (one JSON file per finished run, as `paper_findings.train_run` writes them) and `<out>/plan.json`.
Runs with aligned masks (`--part pairing`) are left to `paper_findings_pairing`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks import harness

MASKS = ("adjacent", "discrete")
PET_PRESETS = ("prompt", "bitfit", "lora", "adapter")
FIG6_BUDGETS = (1600, 6400, 73728)  # panels of the convergence plot (the table has every budget)
SWEEP_COMMANDS = {"default": "nice -n 15 python -m benchmarks.paper_findings",
                  "full": "nice -n 15 python -m benchmarks.paper_findings --full"}
RUN_COLUMNS = ["key", "model", "task", "method", "structure", "mask", "budget", "seed", "lr", "steps", "max_len",
               "batch_size", "trainable_apet", "trainable_head", "test_accuracy", "test_macro_f1",
               "test_generation_accuracy", "validation_accuracy", "wall_s", "cpu_s", "finished"]


# ---------------------------------------------------------------------------------------------- analysis
@dataclass
class Point:
    """Test accuracy of one configuration over its seeds; `err` is the std over seeds (ddof=1) or, for one
    seed, the binomial standard error sqrt(p (1 - p) / n_test)."""

    mean: float
    err: float
    n: int

    @classmethod
    def of(cls, records: list[dict], metric: str = "accuracy") -> Point:
        values = [r["test"][metric] for r in records]
        mean = float(np.mean(values))
        if len(values) > 1:
            return cls(mean, float(np.std(values, ddof=1)), len(values))
        return cls(mean, math.sqrt(mean * (1 - mean) / records[0]["n_test"]), 1)

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.err:.1f} ({self.n})"


LOW_MARGIN = 0.02  # "clearly above random": mean - err > random + 2 points
HIGH_MARGIN = 0.01  # "reaches full fine-tuning": mean >= FT mean - 1 point


def low_threshold(curve: dict[int, Point], floor: float) -> tuple[int | None, int | None]:
    """(last budget not clearly above `floor`, first budget clearly above it); None where there is none."""
    below = None
    for budget in sorted(curve):
        point = curve[budget]
        if point.mean - point.err > floor + LOW_MARGIN:
            return below, budget
        below = budget
    return below, None


def high_threshold(curve: dict[int, Point], full: float) -> tuple[int | None, int | None]:
    """(last budget below full fine-tuning - 1 point, first budget within 1 point of it)."""
    below = None
    for budget in sorted(curve):
        if curve[budget].mean >= full - HIGH_MARGIN:
            return below, budget
        below = budget
    return below, None


def _group(records: list[dict], *fields: str) -> dict:
    """Records by the value of `fields` (a tuple of values for several fields, the value itself for one)."""
    groups: dict = {}
    for r in records:
        key = tuple(r[f] for f in fields) if len(fields) > 1 else r[fields[0]]
        groups.setdefault(key, []).append(r)
    return groups


def analyse(records: list[dict], lrs: dict[str, float]) -> dict[tuple[str, str, str], dict]:
    """Everything the report shows, per (model, task, metric): curves, reference lines, thresholds, Figure 5/6.

    The metric is "accuracy" (class scores; random guess 1 / classes) and, for the LM, also
    "generation_accuracy" (the full-vocabulary argmax must be the label word, as the paper's T5 generation;
    random guess 0). APET runs at an lr other than the one picked for their mask (`lrs`) are the lr-pick's
    losers and are left out, and so are runs with aligned masks (the paper's masks are independent).
    """
    records = [r for r in records if r["method"] != "apet" or (r["lr"] == lrs.get(r["mask"], r["lr"])
                                                               and r.get("pairing") != "aligned")]
    out = {}
    for (model, task), rs in _group(records, "model", "task").items():
        metrics = ["accuracy"] + (["generation_accuracy"] if "generation_accuracy" in rs[0]["test"] else [])
        for metric in metrics:
            random_guess = 1.0 / rs[0]["num_labels"] if metric == "accuracy" else 0.0
            out[(model, task, metric)] = _analyse_group(rs, metric, random_guess)
    return out


def _analyse_group(rs: list[dict], metric: str, random_guess: float) -> dict:
    by_method = _group(rs, "method")
    full = Point.of(by_method["full"], metric) if "full" in by_method else None
    baseline_method = "zero_shot" if "zero_shot" in by_method else "head"
    baseline = Point.of(by_method[baseline_method], metric) if baseline_method in by_method else None
    curves = {f"{s}/{m}": {b: Point.of(g, metric) for b, g in _group(members, "budget").items()}
              for (s, m), members in _group(by_method.get("apet", []), "structure", "mask").items()}
    if "lora" in by_method:  # the unmasked LoRA preset is the lora structure at full capacity
        for name in [n for n in curves if n.startswith("lora/")]:
            curves[name][by_method["lora"][0]["trainable_apet"]] = Point.of(by_method["lora"], metric)
    thresholds = {}
    for name, curve in curves.items():
        row = {"low_vs_random": low_threshold(curve, random_guess)}
        if baseline is not None:
            row[f"low_vs_{baseline_method}"] = low_threshold(curve, baseline.mean)
        if full is not None:
            row["high"] = high_threshold(curve, full.mean)
        thresholds[name] = row
    fig5 = []
    for preset in PET_PRESETS:
        if preset in by_method:
            count = by_method[preset][0]["trainable_apet"]
            fig5.append({"preset": preset, "count": count, "pet": Point.of(by_method[preset], metric),
                         **{mask: curves.get(f"delta/{mask}", {}).get(count) for mask in MASKS}})
    convergence = {}
    for (structure, budget), members in _group(by_method.get("apet", []), "structure", "budget").items():
        masks = _group(members, "mask")
        if set(masks) >= set(MASKS) and metric == "accuracy":  # curves are validation class accuracy
            convergence[(structure, budget)] = {m: _mean_curve(masks[m]) for m in MASKS}
    return {"random": random_guess, "full": full, "baseline": baseline, "baseline_method": baseline_method,
            "model_params": by_method["full"][0]["trainable_total"] if "full" in by_method else None,
            "curves": curves, "thresholds": thresholds, "fig5": fig5, "convergence": convergence}


def _mean_curve(records: list[dict]) -> list[tuple[int, float]]:
    steps = sorted({s for r in records for s, _ in r["curve"]})
    values = {s: [a for r in records for t, a in r["curve"] if t == s] for s in steps}
    return [(s, float(np.mean(values[s]))) for s in steps]


def steps_to_fraction(curve: list[tuple[int, float]], start: float, fraction: float = 0.9) -> int | None:
    """First step at which the curve has made `fraction` of its total gain over `start` (its best minus start)."""
    best = max(a for _, a in curve)
    if best <= start:
        return None
    target = start + fraction * (best - start)
    return next(s for s, a in curve if a >= target)


# ---------------------------------------------------------------------------------------------- report
def _fmt_budget(b: int | None) -> str:
    return "—" if b is None else f"{b:.1e}".replace("e+0", "e").replace("e+", "e")


def _fmt_threshold(pair: tuple[int | None, int | None], smallest: int) -> str:
    below, first = pair
    if first is None:
        return f"not reached (≤ {_fmt_budget(below)})" if below is not None else "—"
    if below is None:
        return f"≤ {_fmt_budget(first)} (first budget)" if first == smallest else _fmt_budget(first)
    return f"{_fmt_budget(first)} (in ({_fmt_budget(below)}, {_fmt_budget(first)}])"


# The paper's §5.3: ranges of the low threshold (entries) per model; it gives no numbers for the high one.
PAPER_LOW_RANGES = {"BERT-small": (4.0e2, 1.6e3), "BERT-large": (8.0e2, 3.2e3), "T5-small": (8.0e2, 7.9e3),
                    "T5-XXL": (7.9e3, 8.5e3)}


def sizes_markdown(analysis: dict) -> list[str]:
    """Issue 16 part 4: both thresholds of each delta curve per encoder (models with a full fine-tuning run), in
    entries and as a share of the model's parameters, beside the paper's ranges. Empty below two such models."""
    rows, models = [], set()
    for (model, task, metric), a in analysis.items():
        if metric != "accuracy" or a["full"] is None or a["baseline_method"] != "head":
            continue
        size = a["model_params"]
        for name in sorted(n for n in a["curves"] if n.startswith("delta/")):
            t, smallest = a["thresholds"][name], min(a["curves"][name])
            cells = []
            for key in ("low_vs_head", "high"):
                first = t[key][1]
                share = f" ({100 * first / size:.3g} %)" if first is not None else ""
                cells.append(_fmt_threshold(t[key], smallest) + share)
            seeds = max(p.n for p in a["curves"][name].values())
            rows.append(f"| {model} | {task} | {size / 1e6:.1f}M | {name} | {seeds} | " + " | ".join(cells) + " |")
            models.add(model)
    if len(models) < 2:
        return []
    paper = "; ".join(f"{m} [{_fmt_budget(int(lo))}, {_fmt_budget(int(hi))}]" for m, (lo, hi) in
                      PAPER_LOW_RANGES.items())
    return ["## Thresholds at two model sizes (issue 16, part 4)", "",
            "Low: the first budget clearly above the head-only floor (mean − err > floor + 2 points); high: the "
            "first within 1 point of full fine-tuning. Shares are of all the model's parameters (its full "
            f"fine-tuning count). The paper's low-threshold ranges: {paper}; for the high threshold it reports "
            "only that it is lower on the larger model.", "",
            "| model | task | parameters | curve | seeds (most) | low threshold | high threshold |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def markdown(analysis: dict, plan: dict, records: list[dict], meta: dict) -> str:
    """The results document: settings, Figure 7 table and thresholds, Figure 5 and Figure 6 tables, gaps."""
    done = {r["key"] for r in records}
    missing = meta["missing"]
    lines = ["# APET paper findings: measured results", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- sweep command: `{plan.get('command') or SWEEP_COMMANDS.get(plan.get('mode'), '?')}`; "
             f"this report: `{meta['command']}`",
             f"- runs finished: {len(done & set(plan.get('runs', [])))} of {len(plan.get('runs', []))} planned"
             + (" — **PARTIAL**" if missing else ""),
             f"- CPU time of finished runs: {meta['cpu_hours']:.2f} h (process time, all threads)", "",
             "Scores in % on the test split: mean ± err (seeds); err is the std over seeds, or the binomial "
             "standard error when a point has one seed.", ""]
    if plan.get("lr_pick"):
        lines += ["## Learning rate of masked APET entries (picked on the validation split)", "",
                  "| mask | validation accuracy by lr (delta, budget 1600) | picked |", "|---|---|---|"]
        for mask, pick in plan["lr_pick"].items():
            vals = ", ".join(f"{lr}: {100 * acc:.1f}" for lr, acc in pick["validation"].items())
            lines.append(f"| {mask} | {vals} | {pick['lr']:g} |")
        lines.append("")
    for (model, task, metric), a in analysis.items():
        lines += [f"## {model} on {task}: {metric.replace('_', ' ')}", "",
                  f"- random guess: {100 * a['random']:.1f}",
                  f"- full fine-tuning: {a['full'] or 'missing'}",
                  f"- {a['baseline_method'].replace('_', '-')} (APET budget 0): {a['baseline'] or 'missing'}", ""]
        budgets = sorted({b for c in a["curves"].values() for b in c})
        if budgets:
            names = sorted(a["curves"])
            lines += ["### Figure 7: test accuracy against trainable APET entries", "",
                      "| budget | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for b in budgets:
                cells = [str(a["curves"][n][b]) if b in a["curves"][n] else "" for n in names]
                lines.append(f"| {_fmt_budget(b)} | " + " | ".join(cells) + " |")
            lines += ["", "### Thresholds", "",
                      "| curve | low (vs random) | low (vs " + a["baseline_method"].replace("_", "-") +
                      ") | high (within 1 pt of FT) |", "|---|---|---|---|"]
            for name in names:
                t, smallest = a["thresholds"][name], min(a["curves"][name])
                cells = [_fmt_threshold(t[k], smallest) if k in t else "—"
                         for k in ("low_vs_random", f"low_vs_{a['baseline_method']}", "high")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        if a["fig5"]:
            lines += ["### Figure 5: PET presets against APET delta at the same number of entries", "",
                      "| preset | entries | preset | APET adjacent | APET discrete | spread (max − min) |",
                      "|---|---|---|---|---|---|"]
            for row in a["fig5"]:
                points = [p for p in (row["pet"], row["adjacent"], row["discrete"]) if p is not None]
                spread = 100 * (max(p.mean for p in points) - min(p.mean for p in points))
                lines.append(f"| {row['preset']} | {row['count']:,} | {row['pet']} | {row['adjacent'] or 'missing'} | "
                             f"{row['discrete'] or 'missing'} | {spread:.1f} |")
            lines.append("")
        if a["convergence"]:
            lines += ["### Figure 6: validation accuracy (curve subset) against steps, adjacent vs discrete", "",
                      "| structure | budget | mask | accuracy at steps … | steps to 90% of the gain |",
                      "|---|---|---|---|---|"]
            for (structure, budget), pair in sorted(a["convergence"].items()):
                for mask in MASKS:
                    curve = pair[mask]
                    points = " ".join(f"{s}:{100 * v:.0f}" for s, v in curve)
                    reach = steps_to_fraction(curve, curve[0][1])
                    lines.append(f"| {structure} | {_fmt_budget(budget)} | {mask} | {points} | {reach or '—'} |")
            lines.append("")
    lines += sizes_markdown(analysis)
    if missing:
        lines += ["## Missing runs (planned, not finished)", ""] + [f"- `{k}`" for k in missing] + [""]
    return "\n".join(lines)


def plots(analysis: dict, out: Path, stamp: str) -> list[Path]:
    """Figure 7, 5 and 6 style PNGs per (model, task, metric), each stamped with date, machine and command."""
    plt = harness.pyplot()
    written = []
    for (model, task, metric), a in analysis.items():
        tag = f"{model}_{task}" + ("" if metric == "accuracy" else f"_{metric}")
        if a["curves"]:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for name in sorted(a["curves"]):
                curve = a["curves"][name]
                xs = sorted(curve)
                ax.errorbar(xs, [100 * curve[x].mean for x in xs], yerr=[100 * curve[x].err for x in xs],
                            marker="o", capsize=3, label=f"APET {name}",
                            linestyle="-" if name.endswith("adjacent") else "--")
            ax.axhline(100 * a["random"], color="grey", linestyle=":", label="random guess")
            if a["full"] is not None:
                ax.axhline(100 * a["full"].mean, color="black", label="full fine-tuning")
            if a["baseline"] is not None:
                ax.axhline(100 * a["baseline"].mean, color="tab:purple", linestyle="-.",
                           label=a["baseline_method"].replace("_", "-") + " (budget 0)")
            ax.set_xscale("log")
            ax.set_xlabel("trainable APET entries")
            ax.set_ylabel(f"test {metric.replace('_', ' ')} (%)")
            ax.set_title(f"Figure 7 — {model}, {task}")
            ax.legend(fontsize=7)
            written.append(harness.save_figure(fig, out / f"fig7_{tag}.png", stamp))
        if a["fig5"]:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            width = 0.27
            for i, (label, key) in enumerate((("PET preset", "pet"), ("APET adjacent", "adjacent"),
                                              ("APET discrete", "discrete"))):
                xs = [j + (i - 1) * width for j in range(len(a["fig5"]))]
                ys = [100 * r[key].mean if r[key] else 0 for r in a["fig5"]]
                es = [100 * r[key].err if r[key] else 0 for r in a["fig5"]]
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=label)
            ax.set_xticks(range(len(a["fig5"])), [f"{r['preset']}\n{r['count']:,}" for r in a["fig5"]])
            ax.axhline(100 * a["random"], color="grey", linestyle=":")
            ax.set_ylim(100 * max(0.0, a["random"] - 0.1), 100)
            ax.set_ylabel(f"test {metric.replace('_', ' ')} (%)")
            ax.set_title(f"Figure 5 — {model}, {task}")
            ax.legend(fontsize=7)
            written.append(harness.save_figure(fig, out / f"fig5_{tag}.png", stamp))
        if a["convergence"]:
            keys = [k for k in sorted(a["convergence"]) if k[1] in FIG6_BUDGETS] or sorted(a["convergence"])[:4]
            fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
            for ax, key in zip(axes[0], keys):
                for mask in MASKS:
                    curve = a["convergence"][key][mask]
                    ax.plot([s for s, _ in curve], [100 * v for _, v in curve], marker=".",
                            linestyle="-" if mask == "adjacent" else "--", label=mask)
                ax.set_title(f"{key[0]}, {_fmt_budget(key[1])}", fontsize=8)
                ax.set_xlabel("steps")
            axes[0][0].set_ylabel("validation accuracy (%)")
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"Figure 6 — {model}, {task}", fontsize=9)
            written.append(harness.save_figure(fig, out / f"fig6_{tag}.png", stamp))
    return written


def _jsonable(analysis: dict) -> dict:
    def convert(value):
        if isinstance(value, Point):
            return asdict(value)
        if isinstance(value, dict):
            return {(("/".join(map(str, k))) if isinstance(k, tuple) else k): convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(analysis)


def run_rows(records: list[dict]) -> list[dict]:
    """The records as `RUN_COLUMNS` rows: the nested test and validation scores as columns of their own."""
    return [{**{c: r.get(c) for c in RUN_COLUMNS}, "test_accuracy": r["test"]["accuracy"],
             "test_macro_f1": r["test"]["macro_f1"], "test_generation_accuracy": r["test"].get("generation_accuracy"),
             "validation_accuracy": r["validation"]["accuracy"]} for r in records]


def report(out: Path, command: str, records: list[dict]) -> dict:
    """Rebuild `results.md`, `runs.csv`, `summary.json` and the PNGs in `out` from the finished runs' `records`
    and `<out>/plan.json`; returns the report's meta data (date, machine, command, CPU hours, missing runs, plots)."""
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {"runs": []}
    lrs = {m: p["lr"] for m, p in plan.get("lr_pick", {}).items()}
    analysis = analyse(records, lrs)
    meta = {"date": harness.now(), "machine": harness.machine_line(), "command": command,
            "cpu_hours": sum(r["cpu_s"] for r in records) / 3600,
            "missing": [k for part in ("runs", "pairing_runs", "sizes_runs") for k in plan.get(part, [])
                        if k not in {r["key"] for r in records}]}
    harness.write_csv(out / "runs.csv", run_rows(records), RUN_COLUMNS)
    (out / "results.md").write_text(markdown(analysis, plan, records, meta))
    harness.write_json(out / "summary.json",
                       {"meta": meta, "lr_pick": plan.get("lr_pick"), "analysis": _jsonable(analysis)})
    meta["plots"] = [str(p.name) for p in plots(analysis, out, harness.stamp(meta["date"], command))]
    return meta
