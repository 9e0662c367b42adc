"""Does dropout on the entries of a sparse delta help? (issue 16, part 3; SpaRTA drops its deltas in training.)

all-MiniLM-L6-v2 (real weights) on Rotten Tomatoes: an APET discrete delta (random mask, the attention and
feed-forward weights) at k = 20,000 and 2,270 entries (about 0.09 % and 0.01 % of the model), `delta_dropout` in
{0, 0.1, 0.3}, three seeds, one epoch. Everything else is paper_findings.py's setup: batch 32, 48 tokens, AdamW
without weight decay at a constant lr of 3e-3 for the delta entries (the lr paper_findings picked on validation for
discrete deltas, used there at every budget) and 3e-4 for the new classifier head (PEFT `modules_to_save`, not
counted in k). A seed fixes the mask, the head's initialisation, the data order and the dropout draws; the three
dropout settings of a seed share the mask, head and data order.

    nice -n 19 python -m benchmarks.delta_dropout --threads 1   # writes benchmarks/results/delta_dropout/
    python -m benchmarks.delta_dropout --smoke --out DIR        # tiny random BERT, two budgets, one seed
    python -m benchmarks.delta_dropout --report-only            # rebuild results.json / results.md from runs.jsonl
    nice -n 19 python -m benchmarks.delta_dropout --threads 1 --lr 1e-2 --budgets 20000 \
        --out benchmarks/results/delta_dropout_lr0.01             # the same at the issue's better lr for k = 20,000

Every finished run is appended to `<out>/runs.jsonl` at once; a rerun skips the runs found there, so an
interrupted sweep resumes. Runs go seed by seed, so a cut sweep still compares every setting on the same seeds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model

from benchmarks import harness
from benchmarks.harness import Task, append_record, evaluate, is_head, load_records
from peft_apet import APETConfig

DELTA_LR = 3e-3  # paper_findings.py: picked on validation (3e-4 vs 3e-3) for discrete deltas, at every budget
HEAD_LR = 3e-4  # paper_findings.py: the head at the paper's PET lr


@dataclass(frozen=True)
class Mode:
    """Size of the sweep: model, budgets, dropout settings, seeds and the data each run sees."""

    name: str
    model: str
    budgets: tuple[int, ...]
    dropouts: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int = 1
    batch_size: int = 32
    max_len: int = 48
    test_size: int = 1000
    subset: int | None = None  # every split cut to its first `subset` examples (smoke)


MODES = {
    "default": Mode("default", "minilm", budgets=(20_000, 2_270), dropouts=(0.0, 0.1, 0.3), seeds=(0, 1, 2)),
    "smoke": Mode("smoke", "tiny-bert", budgets=(10, 100), dropouts=(0.0, 0.3), seeds=(0,), batch_size=8,
                  max_len=16, test_size=32, subset=48),
}


@dataclass(frozen=True)
class RunSpec:
    budget: int
    dropout: float
    seed: int
    lr: float = DELTA_LR

    @property
    def key(self) -> str:
        return f"k{self.budget}-p{self.dropout:g}-s{self.seed}" + ("" if self.lr == DELTA_LR else f"-lr{self.lr:g}")


def run(spec: RunSpec, task: Task, mode: Mode) -> dict:
    """Train one delta for one epoch and return its record (validation and test accuracy, counts, time)."""
    wall = time.perf_counter()
    torch.manual_seed(spec.seed)
    config = APETConfig.delta(mask="discrete", num_trainable_params=spec.budget, delta_dropout=spec.dropout,
                              task_type="SEQ_CLS", seed=spec.seed)
    model = get_peft_model(harness.new_model(task), config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not is_head(n)], "lr": spec.lr},
                                   {"params": [p for n, p in named if is_head(n)], "lr": HEAD_LR}], weight_decay=0.0)
    steps = mode.epochs * (len(task.splits["train"]) // mode.batch_size)
    model.train()
    losses = harness.train_steps(model, optimizer, task, steps, mode.batch_size, spec.seed)
    return {
        **asdict(spec), "key": spec.key, "model": mode.model, "steps": steps, "head_lr": HEAD_LR,
        "trainable_apet": sum(p.numel() for n, p in named if not is_head(n)),
        "trainable_head": sum(p.numel() for n, p in named if is_head(n)),
        "validation_accuracy": evaluate(model, task.splits["validation"], task, False)["accuracy"],
        "test_accuracy": evaluate(model, task.splits["test"], task, False)["accuracy"],
        "loss_last": statistics.fmean(losses[-10:]) if losses else None,
        "wall_s": round(time.perf_counter() - wall, 1), "finished": harness.now(),
    }


def summarise(records: list[dict], mode: Mode) -> list[dict]:
    """Mean ± std (over seeds) of test and validation accuracy per (budget, dropout), with the paired difference
    to dropout 0 on the same seeds."""
    rows = []
    for budget in mode.budgets:
        base = {r["seed"]: r["test_accuracy"] for r in records if r["budget"] == budget and r["dropout"] == 0.0}
        for p in mode.dropouts:
            runs = sorted((r for r in records if r["budget"] == budget and r["dropout"] == p), key=lambda r: r["seed"])
            if not runs:
                continue
            test = [r["test_accuracy"] for r in runs]
            diffs = [r["test_accuracy"] - base[r["seed"]] for r in runs if r["seed"] in base]
            rows.append({
                "budget": budget, "dropout": p, "seeds": [r["seed"] for r in runs],
                "test_mean": statistics.fmean(test), "test_std": statistics.stdev(test) if len(test) > 1 else None,
                "validation_mean": statistics.fmean(r["validation_accuracy"] for r in runs),
                "paired_diff_mean": statistics.fmean(diffs) if diffs and p != 0.0 else None,
                "paired_diffs": diffs if p != 0.0 else None,
            })
    return rows


def _pct(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| k | delta_dropout | seeds | test accuracy % (mean ± std) | validation % (mean) | "
             "test − dropout 0, same seed (points) |", "|---|---|---|---|---|---|"]
    for r in rows:
        diffs = "–" if r["paired_diffs"] is None else (
            f"{_pct(r['paired_diff_mean'], True)} ({', '.join(_pct(d, True) for d in r['paired_diffs'])})")
        lines.append(f"| {r['budget']:,} | {r['dropout']:g} | {len(r['seeds'])} | {_pct(r['test_mean'])} ± "
                     f"{_pct(r['test_std'])} | {_pct(r['validation_mean'])} | {diffs} |")
    return "\n".join(lines)


def write_report(out: Path, mode: Mode, lr: float, command: str, records: list[dict]) -> None:
    records = [r for r in records if r["lr"] == lr]
    rows = summarise(records, mode)
    planned = [RunSpec(k, p, s, lr).key for s in mode.seeds for k in mode.budgets for p in mode.dropouts]
    missing = [key for key in planned if key not in {r["key"] for r in records}]
    meta = {"mode": mode.name, "command": command, "written": harness.now(), "machine": harness.machine(),
            "settings": {**asdict(mode), "delta_lr": lr, "head_lr": HEAD_LR}, "missing_runs": missing}
    harness.write_json(out / "results.json", {"meta": meta, "summary": rows, "runs": records}, end="\n")
    steps = sorted({r["steps"] for r in records})
    (out / "results.md").write_text(
        "# Dropout on sparse deltas (`delta_dropout`)\n\n"
        f"`{command}`, written {meta['written']}; {harness.machine_line()}. Model {mode.model}, Rotten Tomatoes "
        f"(test: first {mode.test_size} examples), APET discrete delta with a random mask, {mode.epochs} epoch "
        f"({', '.join(map(str, steps))} steps of batch {mode.batch_size}), AdamW lr {lr:g} (delta) / "
        f"{HEAD_LR:g} (head). Seeds: {list(mode.seeds)}. Runs: `runs.jsonl`.\n\n"
        + table(rows) + "\n\n"
        + (f"Missing runs (not finished): {', '.join(missing)}.\n" if missing else "All planned runs finished.\n"))


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "delta_dropout", smoke="tiny random BERT, two budgets, one seed",
                               report_only="rebuild results.json / results.md from runs.jsonl", threads=1)
    parser.add_argument("--lr", type=float, default=DELTA_LR, help=f"lr of the delta entries (default {DELTA_LR:g})")
    parser.add_argument("--budgets", type=int, nargs="+", help="budgets k to run instead of the mode's")
    args = parser.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "default"]
    if args.budgets:
        mode = replace(mode, budgets=tuple(args.budgets))
    out = args.out or harness.results_folder("delta_dropout")
    command = harness.start("delta_dropout", argv, out, args.threads)
    path = out / "runs.jsonl"
    if not args.report_only:
        log = harness.logger(out / "sweep.log")
        task = harness.load_model_task(mode.model, "rotten_tomatoes", max_len=mode.max_len, test_size=mode.test_size,
                                       subset=mode.subset)
        done = {r["key"] for r in load_records(path)}
        for seed in mode.seeds:
            for spec in (RunSpec(k, p, seed, args.lr) for k in mode.budgets for p in mode.dropouts):
                if spec.key in done:
                    continue
                record = run(spec, task, mode)
                append_record(path, record)
                log(f"{spec.key}: test {record['test_accuracy']:.3f}, validation {record['validation_accuracy']:.3f}, "
                    f"{record['wall_s']} s")
    write_report(out, mode, args.lr, command, load_records(path))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
