"""Which entries should a sparse delta train? Random, magnitude, gradient, Fisher and SAM masks at equal budgets.

One command runs the sweep (resuming from `<out>/runs.jsonl`) and writes the report (see MASK_SELECTION.md)::

    nice -n 15 python -m benchmarks.mask_selection                 # default: 4 budgets x 5 strategies x 3 seeds
    python -m benchmarks.mask_selection --smoke --out /tmp/x       # tiny random BERT, 2 budgets, 2 steps (the test)
    python -m benchmarks.mask_selection --report-only              # rebuild tables and plot from finished runs
    python -m benchmarks.mask_selection --part lr-check            # diagnostic: all strategies at smaller lrs

Setup (the task, model and training loop of `benchmarks.harness`, as in `paper_findings`): all-MiniLM-L6-v2 with
a new classification head (PEFT `modules_to_save`, reported apart) on Rotten Tomatoes; a discrete masked `delta` of
exactly `budget` entries on the base weights of every attention and feed-forward linear layer. Strategies:

- `random`: the seeded uniform draw, split over modules by capacity (the default of `APETConfig.delta`);
- `magnitude`, `gradient`, `fisher`, `sam`: `selection_scope="global"`, i.e. one top-k over all targeted weights
  (Fu et al.'s setting), the data-driven ones calibrated by `peft_apet.calibrate_masks` on the same
  `Mode.calibration_batches` training batches for every strategy of a seed, before training.

Everything else is identical across strategies for a seed: head initialisation, data order, learning rate (picked
once on the validation split with random masks, see `LR_CANDIDATES`), steps. Seeds vary the head, the data order,
the calibration batches and the random masks. Each record holds the test and validation accuracy, the measured
number of trainable APET entries, the calibration time and where the mask put its entries (per weight kind).
References: the head alone trained the same way (`baselines.jsonl`, k = 0) and random guessing (50 %).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model

from benchmarks import harness
from benchmarks.harness import Task, append_record, evaluate, is_head, load_records
from peft_apet import APETConfig, calibrate_masks
from peft_apet.layer import APETLayer

STRATEGIES = ("random", "magnitude", "gradient", "fisher", "sam")
LR_CANDIDATES = (1e-2, 3e-2)
LR_PICK_BUDGET = 10_000
# (budget, lr, seed): every strategy once more at a smaller lr than the picked one (a diagnostic)
LR_CHECKS = ((1_000, 1e-2, 0), (100_000, 3e-3, 0))
HEAD_LR = 1e-3  # the new classifier head, the same for every run (3e-4 leaves it untrained in 100 steps)
CSV_COLUMNS = ["strategy", "budget", "seed", "lr", "steps", "trainable_apet", "test_accuracy", "validation_accuracy",
               "calibration_s", "wall_s", "finished"]


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Mode:
    """Size of the sweep: the model, the budget grid, seeds, steps and the data each run sees."""

    name: str
    model: str
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    calibration_batches: int = 8
    batch_size: int = 32
    max_len: int = 48
    test_size: int = 1000
    lr_candidates: tuple[float, ...] = LR_CANDIDATES


MODES = {
    "default": Mode(name="default", model="minilm", budgets=(100, 1_000, 10_000, 100_000), seeds=(0, 1, 2),
                    steps=100),
    "smoke": Mode(name="smoke", model="tiny-bert", budgets=(10, 100), seeds=(0,), steps=2, calibration_batches=2,
                  batch_size=8, max_len=16, test_size=32, lr_candidates=(1e-2,)),
}


# ---------------------------------------------------------------------------------------------- one run
def weight_kind(module_name: str) -> str:
    """`attention.self.query`, `intermediate.dense`, ... : the module name without its layer prefix."""
    parts = module_name.split(".")
    return ".".join(parts[parts.index("layer") + 2:]) if "layer" in parts else module_name


def delta_config(strategy: str, budget: int, seed: int) -> APETConfig:
    scope = "module" if strategy == "random" else "global"
    return APETConfig.delta(mask="discrete", num_trainable_params=budget, mask_strategy=strategy,
                            selection_scope=scope, task_type="SEQ_CLS", seed=seed)


def run(strategy: str, budget: int, seed: int, lr: float, task: Task, mode: Mode) -> dict:
    """Build, calibrate, train and evaluate one configuration; returns its record."""
    wall = time.perf_counter()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random placeholders until calibrate_masks"
        model = get_peft_model(harness.new_model(task), delta_config(strategy, budget, seed))
    calibration_s = 0.0
    if strategy in ("gradient", "fisher", "sam"):
        start = time.perf_counter()
        calibrate_masks(model, harness.calibration_batches(task, mode.batch_size, mode.calibration_batches, seed),
                        max_batches=mode.calibration_batches)
        calibration_s = time.perf_counter() - start
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = sum(v for n, v in trainable.items() if is_head(n))
    spread: dict[str, int] = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, APETLayer) and "delta" in module.apet_weights["default"]:
            kind = weight_kind(name)
            spread[kind] = spread.get(kind, 0) + module.apet_weights["default"]["delta"].num_entries

    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not is_head(n)], "lr": lr},
                                   {"params": [p for n, p in named if is_head(n)], "lr": HEAD_LR}],
                                  weight_decay=0.0)
    losses = harness.train_steps(model, optimizer, task, mode.steps, mode.batch_size, seed)
    return {
        "strategy": strategy, "budget": budget, "seed": seed, "lr": lr, "steps": mode.steps, "model": mode.model,
        "trainable_apet": sum(trainable.values()) - head, "trainable_head": head, "entries_by_weight": spread,
        "calibration_s": round(calibration_s, 2),
        "validation_accuracy": evaluate(model, task.splits["validation"], task, False)["accuracy"],
        "test_accuracy": evaluate(model, task.splits["test"], task, False)["accuracy"],
        "loss_last": float(np.mean(losses[-10:])) if losses else None,
        "wall_s": round(time.perf_counter() - wall, 2),
        "finished": harness.now(),
    }


def head_only(seed: int, task: Task, mode: Mode) -> dict:
    """The baseline every strategy adds its delta to: the same head (same seed), data order and steps, no delta."""
    wall = time.perf_counter()
    torch.manual_seed(seed)
    model = harness.new_model(task)
    for name, p in model.named_parameters():
        p.requires_grad_(is_head(name))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=HEAD_LR, weight_decay=0.0)
    harness.train_steps(model, optimizer, task, mode.steps, mode.batch_size, seed)
    return {"strategy": "head-only", "budget": 0, "seed": seed, "steps": mode.steps, "model": mode.model,
            "trainable_apet": 0, "trainable_head": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "test_accuracy": evaluate(model, task.splits["test"], task, False)["accuracy"],
            "wall_s": round(time.perf_counter() - wall, 2),
            "finished": harness.now()}


# ---------------------------------------------------------------------------------------------- sweep
def baselines(mode: Mode, out: Path, log, task: Task) -> None:
    path = out / "baselines.jsonl"
    done = {r["seed"] for r in load_records(path)}
    for seed in mode.seeds:
        if seed not in done:
            record = head_only(seed, task, mode)
            append_record(path, record)
            log(f"head-only seed {seed}: test {record['test_accuracy']:.4f} (run {record['wall_s']:.0f} s)")


def lr_check(mode: Mode, out: Path, log, task: Task) -> None:
    """Every strategy at each of `LR_CHECKS`' (budget, lr, seed) with a smaller lr than the picked one: is a gap
    between strategies an lr effect?"""
    path = out / "lr_check.jsonl"
    for budget, lr, seed in LR_CHECKS:
        for strategy in STRATEGIES:
            done = {(r["strategy"], r["budget"], r["lr"], r["seed"]) for r in load_records(path)}
            if (strategy, budget, lr, seed) not in done:
                record = run(strategy, budget, seed, lr, task, mode)
                append_record(path, record)
                log(f"lr check {strategy:9s} k={budget:,} lr {lr:g} seed {seed}: test {record['test_accuracy']:.4f}")


def sweep(mode: Mode, out: Path, log, part: str = "all") -> None:
    runs_path, picks_path = out / "runs.jsonl", out / "lr_pick.jsonl"
    task = harness.load_model_task(mode.model, "rotten_tomatoes", max_len=mode.max_len, test_size=mode.test_size,
                                   subset=64 if mode.name == "smoke" else None)
    if part == "lr-check":
        return lr_check(mode, out, log, task)
    if part in ("all", "baselines"):
        baselines(mode, out, log, task)
    if part == "baselines":
        return
    picks = load_records(picks_path)
    for lr in mode.lr_candidates:
        if len(mode.lr_candidates) > 1 and not any(p["lr"] == lr for p in picks):
            picks.append(run("random", LR_PICK_BUDGET, 0, lr, task, mode))
            append_record(picks_path, picks[-1])
            log(f"lr pick {lr:g}: validation {picks[-1]['validation_accuracy']:.4f}")
    lr = max(picks, key=lambda p: p["validation_accuracy"])["lr"] if picks else mode.lr_candidates[0]
    log(f"learning rate {lr:g}")
    for seed in mode.seeds:
        for budget in mode.budgets:
            for strategy in STRATEGIES:
                done = {(r["strategy"], r["budget"], r["seed"]) for r in load_records(runs_path)}
                if (strategy, budget, seed) in done:  # read again before each run: another process may share the file
                    continue
                record = run(strategy, budget, seed, lr, task, mode)
                append_record(runs_path, record)
                log(f"{strategy:9s} k={budget:>7,} seed {seed}: test {record['test_accuracy']:.4f} "
                    f"(calibration {record['calibration_s']:.1f} s, run {record['wall_s']:.0f} s)")


# ---------------------------------------------------------------------------------------------- report
def unique(records: list[dict]) -> list[dict]:
    """The first record of each (strategy, budget, seed, lr): a rerun or a second process never counts twice."""
    seen, out = set(), []
    for r in records:
        key = (r["strategy"], r["budget"], r["seed"], r.get("lr"))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(records: list[dict]) -> dict[tuple[str, int], dict]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        mean, std = mean_std([r["test_accuracy"] for r in rs])
        out[key] = {"mean": mean, "std": std, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                    "calibration_s": float(np.mean([r.get("calibration_s", 0.0) for r in rs])),
                    "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
    return out


def paired_vs_random(records: list[dict]) -> dict[tuple[str, int], dict]:
    """Per-seed test accuracy of a strategy minus that of random masks (same seed: same head, data order, lr)."""
    acc = {(r["strategy"], r["budget"], r["seed"]): r["test_accuracy"] for r in records}
    out = {}
    for (s, b, seed), a in acc.items():
        if s != "random" and ("random", b, seed) in acc:
            out.setdefault((s, b), []).append(a - acc["random", b, seed])
    return {key: dict(zip(("mean", "std"), mean_std(d)), n=len(d)) for key, d in out.items()}


def pct(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" + ("" if n == 3 else f" (n={n})")


def markdown(records: list[dict], picks: list[dict], base: list[dict], meta: dict) -> str:
    summary, paired = summarise(records), paired_vs_random(records)
    budgets = sorted({b for _, b in summary})
    steps = records[0]["steps"] if records else "?"
    lines = [f"# Mask selection on {records[0]['model'] if records else '?'} + Rotten Tomatoes", ""]
    if len(records) < meta["expected_runs"]:
        lines += [f"**PARTIAL: {len(records)} of {meta['expected_runs']} runs finished** (cells show n when it is "
                  "not 3 seeds).", ""]
    lines += [f"- produced: {meta['first_finished']} to {meta['last_finished']}; report written {meta['date']}",
              f"- machine: {meta['machine']}",
              f"- command: `{meta['command']}` (resumes; this report: `{meta['report_command']}`)",
              f"- runs: {len(records)}; steps per run: {steps}; learning rate of the delta entries: "
              f"{records[0]['lr'] if records else '?'} (head {HEAD_LR:g}); mean wall time per run "
              f"{meta['mean_wall_s']:.0f} s", ""]
    if picks:
        lines += ["Learning-rate pick (random masks, k = {:,}, seed 0, validation accuracy): ".format(
            picks[0]["budget"]) + ", ".join(f"{p['lr']:g}: {100 * p['validation_accuracy']:.1f}%" for p in picks),
            ""]
    lines += ["Test accuracy (%, 1000 test examples), mean ± std over seeds 0, 1, 2; **bold**: best mean at that "
              "budget.", "",
              "| strategy | " + " | ".join(f"k = {b:,}" for b in budgets) + " | calibration (s) |",
              "|---|" + "---|" * len(budgets) + "---|"]
    best = {b: max((s for s in STRATEGIES if (s, b) in summary), key=lambda s: summary[s, b]["mean"])
            for b in budgets}
    for s in STRATEGIES:
        cells = []
        for b in budgets:
            c = summary.get((s, b))
            cell = pct(c["mean"], c["std"], c["n"]) if c else "—"
            cells.append(f"**{cell}**" if c and best[b] == s else cell)
        cal = [summary[s, b]["calibration_s"] for b in budgets if (s, b) in summary]
        lines.append(f"| {s} | " + " | ".join(cells) + (f" | {np.mean(cal):.1f} |" if cal else " | — |"))
    if base:
        m, sd = mean_std([r["test_accuracy"] for r in base])
        lines.append(f"| head only (k = 0) | {pct(m, sd, len(base))} (all budgets) |" + " |" * len(budgets))
    lines += ["", "Paired difference to random masks (percentage points, same seed; mean ± std over seeds):", "",
              "| strategy | " + " | ".join(f"k = {b:,}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for s in STRATEGIES[1:]:
        cells = [f"{100 * paired[s, b]['mean']:+.1f} ± {100 * paired[s, b]['std']:.1f}"
                 + ("" if paired[s, b]["n"] == 3 else f" (n={paired[s, b]['n']})") if (s, b) in paired else "—"
                 for b in budgets]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    checks = meta.get("lr_check") or []
    by_key = {(r["strategy"], r["budget"], r["seed"]): r for r in records}
    for budget, lr, seed in sorted({(c["budget"], c["lr"], c["seed"]) for c in checks}):
        lines += ["", f"Diagnostic: every strategy again at k = {budget:,}, seed {seed}, with lr {lr:g} instead of "
                  f"{records[0]['lr'] if records else '?'} (test accuracy %, final training loss = mean of the last "
                  "10 steps):", "", "| strategy | picked lr | loss | smaller lr | loss |", "|---|---|---|---|---|"]
        group = [c for c in checks if (c["budget"], c["lr"], c["seed"]) == (budget, lr, seed)]
        for c in sorted(group, key=lambda c: STRATEGIES.index(c["strategy"])):
            main = by_key.get((c["strategy"], budget, seed))
            first = f"{100 * main['test_accuracy']:.1f} | {main['loss_last']:.3f}" if main else "— | —"
            lines.append(f"| {c['strategy']} | {first} | {100 * c['test_accuracy']:.1f} | {c['loss_last']:.3f} |")
    lines += ["", "Where the masks put their entries (share of the budget per weight kind, summed over the 6 layers, "
              "seed 0):", ""]
    kinds = sorted({k for r in records for k in r["entries_by_weight"]})
    lines += ["| strategy | k | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in sorted((r for r in records if r["seed"] == 0), key=lambda r: (r["budget"], STRATEGIES.index(
            r["strategy"]))):
        total = sum(r["entries_by_weight"].values())
        lines.append(f"| {r['strategy']} | {r['budget']:,} | " + " | ".join(
            f"{100 * r['entries_by_weight'].get(k, 0) / total:.0f}%" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], base: list[dict], path: Path, stamp: str) -> None:
    plt = harness.pyplot()
    summary = summarise(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, s in enumerate(STRATEGIES):
        budgets = sorted(b for t, b in summary if t == s)
        xs = [b * (1 + 0.06 * (i - 2)) for b in budgets]  # small offsets so error bars do not overlap
        ax.errorbar(xs, [100 * summary[s, b]["mean"] for b in budgets],
                    yerr=[100 * summary[s, b]["std"] for b in budgets], marker="o", capsize=3, label=s)
    if base:
        m, sd = mean_std([r["test_accuracy"] for r in base])
        ax.axhline(100 * m, color="black", linestyle="--", linewidth=1, label="head only (k = 0)")
        ax.axhspan(100 * (m - sd), 100 * (m + sd), color="black", alpha=0.08)
    ax.axhline(50.0, color="grey", linestyle=":", label="random guess")
    if summary:
        ax.set_xscale("log")
    ax.set_xlabel("trainable delta entries k (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("Mask selection strategies at equal budgets (MiniLM, Rotten Tomatoes)", fontsize=10)
    ax.legend(fontsize=7)
    harness.save_figure(fig, path, stamp)


def report(out: Path, command: str, mode: Mode) -> None:
    records, picks = unique(load_records(out / "runs.jsonl")), load_records(out / "lr_pick.jsonl")
    base = unique(load_records(out / "baselines.jsonl"))
    checks = unique(load_records(out / "lr_check.jsonl"))
    finished = sorted(r["finished"] for r in records) or ["—"]
    produced_by = "python -m benchmarks.mask_selection" + (" --smoke" if mode.name == "smoke" else "")
    meta = {"date": harness.now(), "machine": harness.machine_line(),
            "command": produced_by, "report_command": command, "first_finished": finished[0],
            "last_finished": finished[-1],
            "expected_runs": len(STRATEGIES) * len(mode.budgets) * len(mode.seeds),
            "mean_wall_s": float(np.mean([r["wall_s"] for r in records])) if records else 0.0}
    (out / "results.md").write_text(markdown(records, picks, base, {**meta, "lr_check": checks}))
    summary = {f"{s}/{b}": v for (s, b), v in summarise(records).items()}
    paired = {f"{s}/{b}": v for (s, b), v in paired_vs_random(records).items()}
    harness.write_json(out / "results.json", {"meta": meta, "lr_pick": picks, "summary": summary,
                                              "paired_vs_random": paired, "head_only": base, "lr_check": checks,
                                              "runs": records})
    harness.write_csv(out / "results.csv", records + base, CSV_COLUMNS)
    plot(records, base, out / "accuracy_vs_budget.png", harness.stamp(meta["last_finished"], produced_by))


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "mask_selection", smoke="tiny random BERT, two budgets, two steps",
                               report_only="only rebuild tables and plot")
    parser.add_argument("--part", choices=("all", "baselines", "grid", "lr-check"), default="all",
                        help="head-only baselines, the strategy grid, both (default), or the lr diagnostic")
    args = parser.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "default"]
    out = args.out or harness.results_folder("mask_selection", mode.name)
    command = harness.start("mask_selection", argv, out, args.threads)
    log = harness.logger(out / "sweep.log")
    if not args.report_only:
        log(f"start {command}")
        sweep(mode, out, log, args.part)
    report(out, command, mode)
    log(f"report written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
