"""The report of `benchmarks.moonshot`: results.md, results.json and lr_curves.png from the records of runs.jsonl.

A group is one (task, method, budget, mask strategy, epochs). Its lr is the best validation accuracy among its
seed-0 runs (`pick_lr`); its result is the test accuracy of every seed at that lr (mean ± sample std). The issue's
targets compare APET's mean with full fine-tuning's mean of the same task and epochs: at 22,700 entries within
0.3 points, at 2,270 within 3 points. The lr rule of part 2 is a least-squares line of log10(picked lr) in
log10(k) over every APET group, clipped to the range of lrs tried.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from benchmarks import harness

TARGETS = {22_700: 0.3, 2_270: 3.0}  # budget -> allowed gap to full fine-tuning (points of test accuracy)


def pick_lr(tried: dict[float, dict]) -> float:
    """The lr of the best validation accuracy among `tried` (lr -> record); ties: the smaller lr."""
    return max(sorted(tried), key=lambda lr: tried[lr]["validation_accuracy"])


def _group(r: dict) -> tuple:
    return r["task"], r["method"], r["budget"], r.get("strategy", "random"), r["epochs"]


def summarise(records: list[dict]) -> list[dict]:
    """One row per group: the lrs tried with their validation accuracy, the picked lr, the seeds at it."""
    groups: dict[tuple, list[dict]] = {}
    for r in {r["key"]: r for r in reversed(records)}.values():  # a run done twice (two processes): its first record
        groups.setdefault(_group(r), []).append(r)
    rows = []
    for (task, method, budget, strategy, epochs), runs in sorted(groups.items(), key=lambda g: (
            g[0][0], -g[0][2] if g[0][1] != "full" else 0, "alsf".index(g[0][1][0]), g[0][3], g[0][4])):
        tried = {r["lr"]: r for r in runs if r["seed"] == 0}
        if not tried:
            continue
        lr = pick_lr(tried)
        at = sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["seed"])
        test = [r["test_accuracy"] for r in at]
        rows.append({
            "task": task, "method": method, "budget": budget, "strategy": strategy, "epochs": epochs,
            "picked_lr": lr, "validation_by_lr": {f"{x:g}": tried[x]["validation_accuracy"] for x in sorted(tried)},
            "seeds": [r["seed"] for r in at], "k": [r["k"] for r in at], "trainable_head": at[0]["trainable_head"],
            "test_mean": statistics.fmean(test), "test_std": statistics.stdev(test) if len(test) > 1 else None,
            "test": test, "lr_at_edge": lr in (min(tried), max(tried)),
        })
    return rows


def targets(rows: list[dict], seeds: int) -> list[dict]:
    """APET's gap to full fine-tuning per (task, budget, mask strategy, epochs) of `TARGETS`, met or missed, with
    the seed-0 validation accuracy at the picked lr (what a choice between strategies may use)."""
    out = []
    for r in rows:
        if r["method"] != "apet" or r["budget"] not in TARGETS:
            continue
        full = next((f for f in rows if f["method"] == "full" and (f["task"], f["epochs"]) == (r["task"], r["epochs"])),
                    None)
        if full is None:
            continue
        gap = 100 * (r["test_mean"] - full["test_mean"])
        complete = len(r["seeds"]) >= seeds and len(full["seeds"]) >= seeds
        out.append({"task": r["task"], "budget": r["budget"], "epochs": r["epochs"], "strategy": r["strategy"],
                    "validation": r["validation_by_lr"][f"{r['picked_lr']:g}"], "apet": r["test_mean"],
                    "full": full["test_mean"], "gap_points": gap, "allowed_points": -TARGETS[r["budget"]],
                    "met": gap >= -TARGETS[r["budget"]], "seeds": (len(r["seeds"]), len(full["seeds"])),
                    "complete": complete})
    return out


def lr_rule(rows: list[dict]) -> dict | None:
    """Least-squares fit log10(lr) = a + b * log10(k) over the APET groups (random masks), or None under 2 budgets."""
    points = [(r["budget"], r["picked_lr"], r["task"]) for r in rows
              if r["method"] == "apet" and r["strategy"] == "random"]
    if len({k for k, _, _ in points}) < 2:
        return None
    x = np.log10([k for k, _, _ in points])
    y = np.log10([lr for _, lr, _ in points])
    b, a = np.polyfit(x, y, 1)
    tried = [float(v) for r in rows if r["method"] == "apet" for v in r["validation_by_lr"]]
    return {"a": float(a), "b": float(b), "clip": [min(tried), max(tried)], "points": points,
            "residual_decades": [float(v) for v in y - (a + b * x)]}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _label(r: dict) -> str:
    extra = [s for s in ((r["strategy"] if r["method"] == "apet" and r["strategy"] != "random" else ""),
                         (f"{r['epochs']} epochs" if r["epochs"] != 1 else "")) if s]
    return r["method"] + (f" ({', '.join(extra)})" if extra else "")


def table(rows: list[dict]) -> str:
    lines = ["| task | k target | method | exact k (per seed) | seeds | test % mean ± std | picked lr | "
             "validation % by lr (seed 0) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ks = sorted(set(r["k"]))
        k = f"{ks[0]:,}" if len(ks) == 1 else ", ".join(f"{v:,}" for v in r["k"])
        val = ", ".join(f"{lr}: {_pct(v)}" for lr, v in r["validation_by_lr"].items())
        target = f"{r['budget']:,}" if r["method"] != "full" else "all"
        lines.append(f"| {r['task']} | {target} | {_label(r)} | {k} | {len(r['seeds'])} | "
                     f"{_pct(r['test_mean'])} ± {_pct(r['test_std'])} | {r['picked_lr']:g}"
                     f"{' (edge)' if r['lr_at_edge'] else ''} | {val} |")
    return "\n".join(lines)


def target_lines(found: list[dict]) -> str:
    lines = []
    for t in found:
        state = "met" if t["met"] else "missed"
        if not t["complete"]:
            state += f" (provisional: {t['seeds'][0]} APET / {t['seeds'][1]} full seeds)"
        masks = "" if t.get("strategy", "random") == "random" else f" ({t['strategy']} masks)"
        lines.append(f"- {t['task']}, k = {t['budget']:,}{masks}, {t['epochs']} epoch(s): APET {_pct(t['apet'])} % "
                     f"(validation {_pct(t['validation'])} % at seed 0) vs full "
                     f"fine-tuning {_pct(t['full'])} %, gap {t['gap_points']:+.1f} points (target ≥ "
                     f"{t['allowed_points']:+.1f}): **{state}**.")
    return "\n".join(lines) or "- not enough runs yet."


def incomplete(rows: list[dict], seeds: int) -> list[str]:
    """The groups of the comparison (not part 2's lr picks) with fewer than `seeds` seeds at their picked lr."""
    return [f"{r['task']} {_label(r)} k={r['budget']:,}: {len(r['seeds'])} of {seeds} seeds" for r in rows
            if len(r["seeds"]) < seeds and not (r["method"] == "apet" and r["budget"] not in TARGETS)]


def figure(rows: list[dict], path: Path, stamp: str) -> Path | None:
    """Validation accuracy (seed 0) against lr, one line per APET budget, one panel per task."""
    apet = [r for r in rows if r["method"] == "apet" and r["strategy"] == "random"]
    tasks = sorted({r["task"] for r in apet})
    if not tasks:
        return None
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in sorted((r for r in apet if r["task"] == task), key=lambda r: r["budget"]):
            lrs = [float(v) for v in r["validation_by_lr"]]
            ax.plot(lrs, [100 * v for v in r["validation_by_lr"].values()], marker="o",
                    label=f"k = {r['budget']:,} ({r['epochs']} ep)")
        ax.set_xscale("log")
        ax.set(title=f"APET discrete, {task}", xlabel="learning rate", ylabel="validation accuracy % (seed 0)")
        ax.legend(fontsize=7)
    return harness.save_figure(fig, path, stamp, bottom=0.06)


def write_report(out: Path, mode, command: str, records: list[dict], planned: list[tuple]) -> None:
    """results.json, results.md and lr_curves.png in `out`; `planned`: the default plan's (task, method, budget)
    groups, those without a run listed as not run."""
    rows = summarise(records)
    not_run = [f"{t} {m} k={b:,}" for t, m, b in planned
               if not any((r["task"], r["method"], r["budget"]) == (t, m, b) for r in rows)]
    found, rule = targets(rows, len(mode.seeds)), lr_rule(rows)
    meta = {"mode": mode.name, "command": command, "written": harness.now(), "machine": harness.machine(),
            "settings": {"model": mode.model, "batch_size": mode.batch_size, "max_len": mode.max_len,
                         "test_size": mode.test_size, "seeds": list(mode.seeds), "warmup": "6 % linear, linear decay",
                         "optimizer": "AdamW, weight decay 0, one lr for all trainable parameters"},
            "incomplete": incomplete(rows, len(mode.seeds)), "not_run": not_run}
    harness.write_json(out / "results.json", {"meta": meta, "summary": rows, "targets": found, "lr_rule": rule,
                                              "runs": records}, end="\n")
    fig = figure(rows, out / "lr_curves.png", harness.stamp(meta["written"][:10], command))
    rule_text = "not enough APET budgets yet." if rule is None else (
        f"log10(lr) = {rule['a']:.2f} {rule['b']:+.3f} · log10(k), clipped to [{rule['clip'][0]:g}, "
        f"{rule['clip'][1]:g}]; residuals (decades): {', '.join(f'{v:+.2f}' for v in rule['residual_decades'])} "
        f"over {len(rule['points'])} (k, task) points.")
    (out / "results.md").write_text(
        "# Moonshot: sparse APET vs full fine-tuning, LoRA and SpaRTA at equal k\n\n"
        f"`{command}`, written {meta['written']}; {harness.machine_line()}. Model {mode.model}; batch "
        f"{mode.batch_size}, {mode.max_len} tokens, AdamW (no weight decay) at one lr for every trainable parameter "
        f"including the head, 6 % linear warm-up then linear decay; lr picked on validation with seed 0, then seeds "
        f"{list(mode.seeds[1:])} at it. Test: first {mode.test_size} examples. Runs: `runs.jsonl`.\n\n"
        + table(rows) + "\n\n## Targets (issue 16, part 3)\n\n" + target_lines(found)
        + "\n\n## lr rule for APET (part 2)\n\n" + rule_text
        + (f"\n\n![validation accuracy vs lr]({fig.name})" if fig else "") + "\n\n"
        + ("Not finished: " + "; ".join(meta["incomplete"]) + ".\n" if meta["incomplete"] else
           "All groups have every seed.\n")
        + (f"Not run at all: {'; '.join(not_run)}.\n" if not_run else ""))
