"""Sparse APET beside full fine-tuning, PEFT LoRA and SpaRTA at equal budgets (issue 16, parts 2 and 3).

all-MiniLM-L6-v2 (real weights) on Rotten Tomatoes and fine_food. Methods, all on the 36 attention and feed-forward
linear layers (query, key, value, attention output, FFN in, FFN out × 6 layers; 10.6M weight entries):

- `apet`: `APETConfig.delta(mask="discrete", num_trainable_params=k, mask_strategy=...)`, exactly k entries (random
  masks per module; `--mask-strategy gradient|fisher|sam`: one global top-k calibrated on 8 training batches);
- `lora`: PEFT LoRA (alpha 8, no dropout) on a subset of those layers with per-layer ranks (`rank_pattern`) whose
  count is the nearest to k that LoRA can reach (`lora_ranks`);
- `sparta`: `peft_sparta.SpaRTA` keeping each targeted entry with probability k / 10.6M (a Bernoulli draw: k varies
  a little from seed to seed);
- `full`: every parameter.
Every run records its exact count k of trained entries (the classifier head, trained in full by every method, is
counted apart). Budgets: 22,700 (0.1 % of MiniLM's 22.7M) and 2,270 (0.01 %).

One protocol for every method (what a Trainer user gets): batch 32, 64 tokens, AdamW without weight decay at one lr
for every trainable parameter including the head, linear warm-up over the first 6 % of steps then linear decay to 0
(`transformers.get_linear_schedule_with_warmup`), `--epochs` epochs, model dropout on. The lr of each (task, method,
budget) is picked on the validation split with seed 0 from `GRIDS` (widened once by one step where the best value is
at an edge), then seeds 1 and 2 run at the picked lr; a seed fixes the head, the data order and the masks. Part 2
(an lr rule for APET): the APET lr pick also runs at `Mode.sweep_budgets`, after the comparison.

    nice -n 10 python -m benchmarks.moonshot --task rotten_tomatoes --threads 1   # writes benchmarks/results/moonshot/
    nice -n 10 python -m benchmarks.moonshot --task fine_food --threads 1         # at the same time, same folder
    python -m benchmarks.moonshot --report-only    # rebuild results.md / results.json / lr_curves.png from runs.jsonl
    python -m benchmarks.moonshot --smoke --out DIR                             # tiny random BERT, two budgets

Every finished run is appended to `<out>/runs.jsonl` as one JSON line (two processes may append at once); a rerun
skips the runs found there, so an interrupted sweep resumes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks import equal_k, harness
from benchmarks.equal_k import METHODS
from benchmarks.harness import Task, evaluate, is_head
from benchmarks.moonshot_report import pick_lr, write_report

GRIDS = {"apet": (3e-3, 1e-2, 3e-2), "sparta": (3e-3, 1e-2, 3e-2), "lora": (1e-3, 3e-3, 1e-2),
         "full": (3e-5, 1e-4, 3e-4)}
TASKS = ("rotten_tomatoes", "fine_food")
PARTS = ("compare", "lr-rule")


@dataclass(frozen=True)
class Mode:
    """Size of the sweep: model, budgets, seeds and the data each run sees."""

    name: str
    model: str
    budgets: tuple[int, ...]
    sweep_budgets: tuple[int, ...]  # APET lr pick only (part 2), after the comparison
    seeds: tuple[int, ...] = (0, 1, 2)  # the first picks the lr
    batch_size: int = 32
    max_len: int = 64
    test_size: int = 1000
    subset: int | None = None  # every split cut to its first `subset` examples (smoke)


MODES = {
    "default": Mode("default", "minilm", budgets=(22_700, 2_270), sweep_budgets=(227, 227_000)),
    "smoke": Mode("smoke", "tiny-bert", budgets=(500, 100), sweep_budgets=(30,), seeds=(0, 1), batch_size=8,
                  max_len=16, test_size=32, subset=48),
}


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    budget: int  # the target k (0 for full fine-tuning)
    lr: float
    seed: int
    epochs: int = 1
    strategy: str = "random"  # APET's mask_strategy

    @property
    def key(self) -> str:
        strategy = f"-{self.strategy}" if self.method == "apet" and self.strategy != "random" else ""
        return f"{self.task}-{self.method}{strategy}-k{self.budget}-lr{self.lr:g}-s{self.seed}-e{self.epochs}"


# ---------------------------------------------------------------------------------------------- the methods
def build(spec: RunSpec, task: Task,
          calibration_batch_size: int = 32) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """`equal_k.build` for one run: a fresh model with `spec.method` at `spec.budget` (discrete APET masks of
    `spec.strategy`), and its trainable (name, parameter) pairs."""
    return equal_k.build(spec.method, spec.budget, task, seed=spec.seed, strategy=spec.strategy,
                         calibration_batch_size=calibration_batch_size)


def counts(named: list[tuple[str, nn.Parameter]]) -> tuple[int, int]:
    """(trained entries outside the head = k, entries of the head)."""
    head = sum(p.numel() for n, p in named if is_head(n))
    return sum(p.numel() for _, p in named) - head, head


# ---------------------------------------------------------------------------------------------- one run
def run(spec: RunSpec, task: Task, mode: Mode) -> dict:
    """Train one (method, budget, lr, seed) for `spec.epochs` epochs; returns its record."""
    from transformers import get_linear_schedule_with_warmup

    wall = time.perf_counter()
    torch.manual_seed(spec.seed)
    model, named = build(spec, task, mode.batch_size)
    k, head = counts(named)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=spec.lr, weight_decay=0.0)
    steps = spec.epochs * (len(task.splits["train"]) // mode.batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)
    model.train()
    losses = harness.train_steps(model, optimizer, task, steps, mode.batch_size, spec.seed,
                                 after_step=lambda step: schedule.step())
    return {
        **asdict(spec), "key": spec.key, "model": mode.model, "k": k, "trainable_head": head, "steps": steps,
        "validation_accuracy": evaluate(model, task.splits["validation"], task, False)["accuracy"],
        "test_accuracy": evaluate(model, task.splits["test"], task, False)["accuracy"],
        "loss_last": statistics.fmean(losses[-10:]), "wall_s": round(time.perf_counter() - wall, 1),
        "finished": harness.now(),
    }


# ---------------------------------------------------------------------------------------------- the sweep
def lr_pick(base: RunSpec, grid: tuple[float, ...], get: Callable[[RunSpec], dict], widen: int) -> float:
    """Run `grid` at seed 0, then up to `widen` times one more lr beyond an edge the best value sits on (one grid
    step further, the step being the ratio of the two values at that edge); returns the picked lr."""
    lrs = sorted(grid)
    tried = {lr: get(replace(base, lr=lr)) for lr in lrs}
    for _ in range(widen):
        best = pick_lr(tried)
        if best not in (lrs[0], lrs[-1]):
            break
        lr = float(f"{lrs[0] ** 2 / lrs[1]:.2g}") if best == lrs[0] else float(f"{lrs[-1] ** 2 / lrs[-2]:.2g}")
        lrs = sorted([*lrs, lr])
        tried[lr] = get(replace(base, lr=lr))
    return pick_lr(tried)


def sweep(task_name: str, task: Task, mode: Mode, out: Path, epochs: int, strategy: str, widen: int,
          log: Callable[[str], None], methods: tuple[str, ...] = METHODS, parts: tuple[str, ...] = PARTS) -> None:
    """Part "compare": every budget in turn, the lr pick of each method, then its other seeds. Part "lr-rule": the
    APET lr pick at `mode.sweep_budgets`."""
    path = out / "runs.jsonl"
    done: dict[str, dict] = {}

    def get(spec: RunSpec) -> dict:
        if spec.key not in done:  # read again: another process may have run it meanwhile
            done.update((r["key"], r) for r in harness.load_records(path, skip_cut_lines=True))
        if spec.key not in done:
            record = run(spec, task, mode)
            harness.append_record(path, record)
            done[spec.key] = record
            log(f"{spec.key}: k {record['k']:,}, validation {record['validation_accuracy']:.3f}, test "
                f"{record['test_accuracy']:.3f}, loss {record['loss_last']:.3f}, {record['wall_s']} s")
        return done[spec.key]

    for i, budget in enumerate(mode.budgets if "compare" in parts else ()):
        bases = [RunSpec(task_name, m, 0 if m == "full" else budget, 0.0, mode.seeds[0], epochs, strategy)
                 for m in methods if m != "full" or i == 0]
        picked = {base: lr_pick(base, GRIDS[base.method], get, widen) for base in bases}
        for base, lr in picked.items():
            for seed in mode.seeds[1:]:
                get(replace(base, lr=lr, seed=seed))
    if "apet" in methods and "lr-rule" in parts:
        for budget in mode.sweep_budgets:
            lr_pick(RunSpec(task_name, "apet", budget, 0.0, mode.seeds[0], epochs, strategy), GRIDS["apet"], get,
                    widen)


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "moonshot", smoke="tiny random BERT, two budgets, two seeds",
                               report_only="rebuild results.md / results.json / lr_curves.png from runs.jsonl",
                               threads=1)
    parser.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS), help="tasks, in turn")
    parser.add_argument("--methods", choices=METHODS, nargs="+", default=list(METHODS))
    parser.add_argument("--parts", choices=PARTS, nargs="+", default=list(PARTS),
                        help="compare: the methods at the budgets; lr-rule: APET's lr pick at more budgets")
    parser.add_argument("--budgets", type=int, nargs="+", help="the comparison's budgets instead of the mode's")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--mask-strategy", default="random", help="APET's mask_strategy (default random)")
    parser.add_argument("--widen", type=int, default=1, help="grid steps added beyond an edge the best lr is at")
    args = parser.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "default"]
    if args.budgets:
        mode = replace(mode, budgets=tuple(args.budgets))
    out = args.out or harness.results_folder("moonshot")
    command = harness.start("moonshot", argv, out, args.threads)
    if not args.report_only:
        log = harness.logger(out / "sweep.log")
        for name in args.task:
            task = harness.load_model_task(mode.model, name, max_len=mode.max_len, test_size=mode.test_size,
                                           subset=mode.subset)
            log(f"{name}: {command}")
            sweep(name, task, mode, out, args.epochs, args.mask_strategy, args.widen, log, tuple(args.methods),
                  tuple(args.parts))
    planned = [(t, m, 0 if m == "full" else b) for t in TASKS for b in mode.budgets for m in METHODS
               if m != "full" or b == mode.budgets[0]] + [(t, "apet", b) for t in TASKS for b in mode.sweep_budgets]
    write_report(out, mode, command, harness.load_records(out / "runs.jsonl", skip_cut_lines=True), planned)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
