"""Reproduce the APET paper's ablations (§5.2-5.3, Figures 5-7) on real weights with peft-apet.

One command runs the sweep, checkpoints every run and writes the report::

    python -m benchmarks.paper_findings                       # default: MiniLM, 26 runs, about 80 min on 2 CPU cores
    python -m benchmarks.paper_findings --with-lm             # default plus SmolLM2-135M (3 runs, about 35 min more)
    python -m benchmarks.paper_findings --full                # the full grid (3 seeds, both tasks, more budgets)
    python -m benchmarks.paper_findings --smoke --out /tmp/x  # tiny random BERT, 2 budgets, 2 steps (the test)
    python -m benchmarks.paper_findings --report-only         # rebuild tables and plots from finished runs
    python -m benchmarks.paper_findings --part pairing        # masked lora/adapter, independent vs aligned masks
    python -m benchmarks.paper_findings --part sizes          # Figure 7 on MiniLM (22.7M) and MPNet (109M), 2 seeds
    python -m benchmarks.paper_findings --part sizes --device cuda   # the same on a GPU

What is measured (see benchmarks/PAPER_FINDINGS.md for the write-up):

- Figure 7: test accuracy against the number of trainable APET entries (log scale) for APET adjacent and discrete
  masks on two structures, `delta` (sparse deltas on the attention and feed-forward weights) and a masked `lora`
  shape (r=8 on query/value), with full fine-tuning and random guessing as horizontal lines. The low threshold is
  the first budget whose accuracy is clearly above random (mean - err > random + 2 points), the high threshold
  the first budget within 1 point of full fine-tuning; err is the std over seeds, or the binomial standard error
  of the test accuracy when a point has one seed.
- Figure 5: Prompt (100 tokens), BitFit, LoRA (r=8, alpha=16, q/v) and Adapter (bottleneck 24) against APET
  adjacent and discrete `delta` adapters given exactly the same number of trainable entries
  (`peft_apet.count_trainable_parameters`).
- Figure 6: validation accuracy against training steps of adjacent vs discrete at equal budget.
- Pairing (`--part pairing`, issue 16): the masked `lora` and a masked `adapter` (bottleneck 24) structure, both
  masks, with the paper's independent A/B (down/up) masks and with aligned ones (`mask_pairing`), at equal
  budgets: Figures 5-6's structure comparisons with every trainable entry able to learn. 16 MiniLM runs per seed.
- Model sizes (`--part sizes`, issue 16 part 4; the paper's Fig. 7 finding that the low threshold grows and the
  high one shrinks with model size): delta adjacent and discrete on a x4 grid of budgets from 100, full
  fine-tuning and the head alone, on all-MiniLM-L6-v2 and all-mpnet-base-v2 (`PooledClassifier`: the same kind of
  head as MiniLM's), seeds 0 and 1, Rotten Tomatoes. One MPNet run costs about 5 MiniLM runs.

Models: all-MiniLM-L6-v2 (22.7M BERT) with a sequence-classification head (`task_type="SEQ_CLS"`, so PEFT trains
the head as a `modules_to_save`; its entries are reported apart from the APET budget), and SmolLM2-135M-Instruct
doing classification as one-token generation: the prompt "Review: <text>\\nSentiment:" is trained with the
cross-entropy of the label word (" negative" / " positive") over the full vocabulary at the last position, and
predictions take the larger of the two label-word logits (no new head, so every trained entry is an APET entry).

Every finished run is one JSON file in `<out>/runs/`; a rerun skips them, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

from benchmarks import harness
from benchmarks.harness import Task, evaluate, is_head, task_type
from benchmarks.paper_findings_pairing import pairing_report
from benchmarks.paper_findings_report import MASKS, PET_PRESETS, report
from peft_apet import APETConfig, count_trainable_parameters

FIG5_ORDER = ("lora", "bitfit", "adapter", "prompt")  # run order: the prompt (100 more tokens) costs most
# Paper, appendix B.3 / C.2: batch 32, lr 3e-4 without warm-up (3e-2 for soft prompts).
PAPER_LR = 3e-4
PROMPT_LR = 3e-2
FT_LR = 1e-4  # full fine-tuning; not given by the paper, not tuned here
LR_CANDIDATES = (3e-4, 3e-3)  # for masked APET entries, picked on the validation split
LR_PICK_BUDGET = 1600
PAIRINGS = ("independent", "aligned")
PARTS = ("paper", "pairing", "sizes")  # --part: Figures 5-7, the pairing comparison, or Figure 7 at two sizes


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Mode:
    """Size of a sweep: which models, tasks, budgets, seeds and how long each run trains."""

    name: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    budgets: tuple[int, ...]  # Figure 7 grid (APET entries)
    seeds: tuple[int, ...]
    steps: dict[str, int]  # per model
    max_len: int = 48  # tokens of text (LM: before the template)
    batch_size: int = 32
    test_size: int = 500  # first examples of the stratified test split
    curve_size: int = 256  # validation examples scored for the convergence curves
    eval_every: int = 25
    lm_budgets: tuple[int, ...] = (1600, 102400)  # SmolLM2 grid (delta only unless lm_presets)
    lm_presets: bool = False  # Figure 5 presets on the LM as well
    lr_candidates: tuple[float, ...] = LR_CANDIDATES
    lora_budgets: tuple[int, ...] | None = None  # None: the Figure 7 grid (capped at the LoRA capacity)
    pairing_budgets: tuple[int, ...] = (1600, 6400)  # --part pairing
    pairing_seeds: tuple[int, ...] = (0, 1)
    size_models: tuple[str, ...] = ("minilm", "mpnet")  # --part sizes
    size_budgets: tuple[int, ...] = (100, 400, 1600, 6400, 25600, 102400, 409600, 1638400)
    size_seeds: tuple[int, ...] = (0, 1)


MODES = {
    # Figure 7's delta curves also get the points of Figure 5's APET runs (at the BitFit, Prompt, LoRA and Adapter
    # counts: 2.6e4 to 2.2e5 on MiniLM), so the default grid stops at 6400, and 10 entries (most matrices get none)
    # and masked LoRA below 1600 are left to --full: the 26 MiniLM runs take about 80 minutes on 2 cores, with a
    # margin under the 90-minute goal. One SmolLM2 training run (60 steps) costs about 15 minutes on 2 cores, so
    # the LM joins the default only with --with-lm: zero-shot and one budget.
    "default": Mode(
        name="default", models=("minilm",), tasks=("rotten_tomatoes",),
        budgets=(100, 400, 1600, 6400), seeds=(0,),
        steps={"minilm": 125, "mpnet": 125, "smollm2": 60}, lora_budgets=(1600,), lm_budgets=(1600,),
    ),
    "full": Mode(
        name="full", models=("minilm", "smollm2"), tasks=("rotten_tomatoes", "fine_food"),
        budgets=(10, 25, 100, 250, 400, 1000, 1600, 4000, 6400, 16000, 25600, 102400, 409600, 1638400),
        seeds=(0, 1, 2), steps={"minilm": 300, "smollm2": 200}, max_len=64, test_size=1000, eval_every=25,
        lm_budgets=(100, 400, 1600, 6400, 25600, 102400, 409600), lm_presets=True,
    ),
    "smoke": Mode(
        name="smoke", models=("tiny-bert",), tasks=("rotten_tomatoes",), budgets=(10, 100), seeds=(0,),
        steps={"tiny-bert": 2}, max_len=16, batch_size=8, test_size=32, curve_size=16, eval_every=1,
        pairing_budgets=(100,), pairing_seeds=(0,), size_models=("tiny-bert",), size_budgets=(10, 100),
        size_seeds=(0,),
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run. `method` is "full" (fine-tuning), "head" (classifier only), "zero_shot" (no training),
    a PET preset ("prompt", "bitfit", "lora", "adapter") or "apet" (a masked `structure` with `budget` entries).
    `pairing` is the `mask_pairing` of a two-matrix structure (None: "independent", the paper's); only "aligned"
    enters the key, so the runs recorded before pairing existed keep their keys."""

    model: str
    task: str
    method: str
    seed: int
    steps: int
    lr: float
    structure: str | None = None
    mask: str | None = None
    budget: int | None = None
    max_len: int = 48
    batch_size: int = 32
    pairing: str | None = None

    @property
    def key(self) -> str:
        parts = [self.model, self.task, self.method, self.structure or "", self.mask or "",
                 str(self.budget or ""), "aligned" if self.pairing == "aligned" else "", f"lr{self.lr:g}",
                 f"s{self.seed}", f"st{self.steps}", f"len{self.max_len}",
                 f"bs{self.batch_size}"]
        return "-".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------- configs
def preset_config(name: str, task: Task, seed: int) -> APETConfig:
    """The paper's PET settings (appendix B.2) as APET presets."""
    common = dict(task_type=task_type(task), seed=seed)
    if name == "prompt":
        return APETConfig.prompt(num_virtual_tokens=100, **common)
    if name == "lora":
        return APETConfig.lora(r=8, lora_alpha=16, **common)
    if name == "adapter":
        return APETConfig.adapter(bottleneck=24, **common)
    if name == "bitfit":
        return APETConfig.bitfit(**common)
    raise ValueError(f"unknown preset {name!r}")


def apet_config(structure: str, mask: str | None, budget: int | None, task: Task, seed: int,
                pairing: str | None = None) -> APETConfig:
    """A masked `delta` (attention + FFN weights), `lora` (r=8, alpha=16, q/v) or `adapter` (bottleneck 24) adapter
    with `budget` entries; the two-matrix ones with `mask_pairing=pairing` (None: the paper's "independent")."""
    common = dict(task_type=task_type(task), seed=seed, mask=mask, num_trainable_params=budget)
    if structure == "delta":
        return APETConfig.delta(**common)
    if structure == "lora":
        return APETConfig.lora(r=8, lora_alpha=16, mask_pairing=pairing or "independent", **common)
    if structure == "adapter":
        return APETConfig.adapter(bottleneck=24, mask_pairing=pairing or "independent", **common)
    raise ValueError(f"unknown structure {structure!r}")


def run_config(spec: RunSpec, task: Task) -> APETConfig | None:
    if spec.method == "apet":
        return apet_config(spec.structure, spec.mask, spec.budget, task, spec.seed, spec.pairing)
    if spec.method in PET_PRESETS:
        return preset_config(spec.method, task, spec.seed)
    return None


# ---------------------------------------------------------------------------------------------- one run
def prepare(spec: RunSpec, task: Task) -> tuple[nn.Module, bool]:
    """The model of a run with exactly the parameters of its method left trainable; returns (model, has_prompt)."""
    torch.manual_seed(spec.seed)
    model = harness.new_model(task)
    config = run_config(spec, task)
    if config is not None:
        return get_peft_model(model, config), config.part("prompt") is not None
    for name, param in model.named_parameters():
        param.requires_grad_(spec.method == "full" or (spec.method == "head" and is_head(name)))
    return model, False


def param_groups(model: nn.Module, spec: RunSpec) -> list[dict]:
    """Adapter entries at the run's lr; a classifier head at the paper's PET lr (so all runs share its speed)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec.method == "full":
        return [{"params": [p for _, p in named], "lr": spec.lr}]
    head = [p for n, p in named if is_head(n)]
    rest = [p for n, p in named if not is_head(n)]
    return [g for g in ({"params": rest, "lr": spec.lr}, {"params": head, "lr": PAPER_LR}) if g["params"]]


def train_run(spec: RunSpec, task: Task, mode: Mode, log: Callable[[str], None] = lambda _: None) -> dict:
    """Train one run and return its record: final validation/test metrics, a validation curve, counts, times."""
    wall, cpu = time.perf_counter(), time.process_time()
    model, has_prompt = prepare(spec, task)
    model.train()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    counts = {"trainable_total": sum(trainable.values()),
              "trainable_head": sum(v for n, v in trainable.items() if is_head(n))}
    counts["trainable_apet"] = counts["trainable_total"] - counts["trainable_head"]
    curve_examples = task.splits["validation"][: mode.curve_size]
    curve = [(0, evaluate(model, curve_examples, task, has_prompt)["accuracy"])]

    def score_curve(step: int) -> None:
        if step % mode.eval_every == 0 or step == spec.steps:
            curve.append((step, evaluate(model, curve_examples, task, has_prompt)["accuracy"]))
            log(f"  {spec.key} step {step}/{spec.steps}: curve accuracy {curve[-1][1]:.3f}")

    losses = []
    if spec.steps and spec.method != "zero_shot":
        optimizer = torch.optim.AdamW(param_groups(model, spec), weight_decay=0.0)
        losses = harness.train_steps(model, optimizer, task, spec.steps, spec.batch_size, spec.seed, has_prompt,
                                     after_step=score_curve)
    return {
        **asdict(spec), "key": spec.key, **counts, "num_labels": task.num_labels,
        "validation": evaluate(model, task.splits["validation"], task, has_prompt),
        "test": evaluate(model, task.splits["test"], task, has_prompt),
        "curve": curve, "loss_first": losses[:5], "loss_last": losses[-5:],
        "n_test": len(task.splits["test"]), "n_train": len(task.splits["train"]),
        "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
        "finished": harness.now(),
    }


# ---------------------------------------------------------------------------------------------- the sweep
class Store:
    """One JSON file per finished run under `<out>/runs/`; failed runs go to `<out>/failed/` and are retried."""

    def __init__(self, out: Path):
        self.runs = out / "runs"
        self.failed = out / "failed"
        self.runs.mkdir(parents=True, exist_ok=True)

    def get(self, spec: RunSpec) -> dict | None:
        path = self.runs / f"{spec.key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, record: dict) -> None:
        tmp = self.runs / f".{record['key']}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.runs / f"{record['key']}.json")

    def fail(self, spec: RunSpec, error: str) -> None:
        self.failed.mkdir(exist_ok=True)
        (self.failed / f"{spec.key}.txt").write_text(error)

    def all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.runs.glob("*.json"))]


def run_all(specs: list[RunSpec], store: Store, get_task: Callable[[str, str], Task], mode: Mode,
            log: Callable[[str], None]) -> list[dict]:
    """Run every spec not yet in the store (in order); a failing run is logged and skipped."""
    records = []
    for spec in specs:
        record = store.get(spec)
        if record is None:
            try:
                record = train_run(spec, get_task(spec.model, spec.task), mode, log)
            except Exception:  # one broken configuration must not stop a long sweep
                store.fail(spec, traceback.format_exc())
                log(f"FAILED {spec.key}:\n{traceback.format_exc()}")
                continue
            store.put(record)
            log(f"done {spec.key}: test acc {record['test']['accuracy']:.4f} val {record['validation']['accuracy']:.4f}"
                f" apet={record['trainable_apet']} wall {record['wall_s']:.0f}s cpu {record['cpu_s']:.0f}s")
        records.append(record)
    return records


def pick_lr(records: list[dict], mask: str) -> float:
    """The lr whose delta run at `LR_PICK_BUDGET` has the best validation accuracy (ties: the paper's 3e-4)."""
    scored = [(r["validation"]["accuracy"], -abs(math.log(r["lr"] / PAPER_LR)), r["lr"]) for r in records
              if r["mask"] == mask]
    return max(scored)[2] if scored else PAPER_LR


def capacity(structure: str, task: Task, model: nn.Module) -> int:
    """Entries of a structure without a mask (the largest budget it can take)."""
    return count_trainable_parameters(model, apet_config(structure, None, None, task, 0))


def preset_counts(task: Task, model: nn.Module) -> dict[str, int]:
    """Trainable entries of each paper PET setting on this model (`count_trainable_parameters`)."""
    return {name: count_trainable_parameters(model, preset_config(name, task, 0)) for name in PET_PRESETS}


def plan_model(model_name: str, task_name: str, mode: Mode, task: Task, lrs: dict[str, float]) -> list[RunSpec]:
    """The runs of one model and task after the lr pick, in priority order (the sweep may be cut anywhere)."""
    steps = mode.steps[model_name]
    base = RunSpec(model_name, task_name, "apet", 0, steps, PAPER_LR, max_len=mode.max_len,
                   batch_size=mode.batch_size)
    torch.manual_seed(0)
    probe = harness.new_model(task)
    caps = {s: capacity(s, task, probe) for s in ("delta", "lora")}
    counts = preset_counts(task, probe)
    del probe
    is_lm = task.kind == "label_words"
    grid = mode.lm_budgets if is_lm else mode.budgets
    lora_grid = mode.lm_budgets if is_lm else (mode.lora_budgets or mode.budgets)
    specs: list[RunSpec] = []
    for seed in mode.seeds:
        seeded = replace(base, seed=seed)
        fig7 = [replace(seeded, structure="delta", mask=m, budget=b, lr=lrs[m])
                for b in coarse_to_fine([b for b in grid if b <= caps["delta"]]) for m in MASKS]
        refs = [replace(seeded, method="zero_shot" if is_lm else "head", steps=0 if is_lm else steps)]
        if not is_lm or mode.lm_presets:
            refs.append(replace(seeded, method="full", lr=FT_LR))
        fig5 = []
        if not is_lm or mode.lm_presets:
            for name in sorted(PET_PRESETS, key=FIG5_ORDER.index):
                fig5.append(replace(seeded, method=name, lr=PROMPT_LR if name == "prompt" else PAPER_LR))
                fig5 += [replace(seeded, structure="delta", mask=m, budget=counts[name], lr=lrs[m]) for m in MASKS]
        lora = [replace(seeded, structure="lora", mask=m, budget=b, lr=lrs[m])
                for b in lora_grid if b < caps["lora"] for m in MASKS] if not is_lm or mode.lm_presets else []
        # Priority: references, the middle and top of the delta grid, Figure 5, the rest of the grid, lora.
        specs += refs + fig7[:4] + fig5 + fig7[4:] + lora
    return list(dict.fromkeys(specs))


def plan_pairing(model_name: str, task_name: str, mode: Mode, lrs: dict[str, float]) -> list[RunSpec]:
    """The pairing comparison: masked lora and adapter x masks x {independent, aligned} at `mode.pairing_budgets`,
    seed by seed and the smallest budget first (a cut sweep keeps whole equal-budget comparisons)."""
    base = RunSpec(model_name, task_name, "apet", 0, mode.steps[model_name], PAPER_LR, max_len=mode.max_len,
                   batch_size=mode.batch_size)
    return [replace(base, seed=seed, structure=structure, mask=mask, budget=budget, lr=lrs[mask], pairing=pairing)
            for seed in mode.pairing_seeds for budget in sorted(mode.pairing_budgets)
            for structure in ("lora", "adapter") for mask in MASKS for pairing in PAIRINGS]


def count_learnable(specs: list[RunSpec], get_task: Callable[[str, str], Task], out: Path) -> dict:
    """`{key: {"learnable", "trainable"}}` of each run's APET adapter (`learnable_entries()`: the entries that can
    receive a gradient), kept in `<out>/learnable.json`; only the runs not in it are built (no training)."""
    path = out / "learnable.json"
    counts = json.loads(path.read_text()) if path.exists() else {}
    for spec in [s for s in specs if s.key not in counts]:
        with warnings.catch_warnings():  # independent masks warn about their unlearnable entries: that is the point
            warnings.simplefilter("ignore", UserWarning)
            model, _ = prepare(spec, get_task(spec.model, spec.task))
        learnable, trainable = model.base_model.learnable_entries()
        counts[spec.key] = {"learnable": learnable, "trainable": trainable}
    harness.write_json(path, counts)
    return counts


def plan_sizes(task_name: str, mode: Mode, tasks: Callable[[str, str], Task], lrs: dict[str, float]) -> list[RunSpec]:
    """Figure 7 at each of `mode.size_models`, seed by seed: every model's head and full fine-tuning runs, then
    delta adjacent/discrete budget by budget (coarse to fine, up to each model's delta capacity), every model at a
    budget before the next, so a cut sweep still has comparable curves of both sizes."""
    caps = {}
    for model_name in mode.size_models:
        torch.manual_seed(0)
        caps[model_name] = capacity("delta", tasks(model_name, task_name), harness.new_model(tasks(model_name,
                                                                                                   task_name)))
    specs = []
    for seed in mode.size_seeds:
        seeded = {m: RunSpec(m, task_name, "apet", seed, mode.steps[m], PAPER_LR, max_len=mode.max_len,
                             batch_size=mode.batch_size) for m in mode.size_models}
        for spec in seeded.values():
            specs += [replace(spec, method="head"), replace(spec, method="full", lr=FT_LR)]
        for budget in coarse_to_fine(list(mode.size_budgets)):
            specs += [replace(spec, structure="delta", mask=mask, budget=budget, lr=lrs[mask])
                      for m, spec in seeded.items() if budget <= caps[m] for mask in MASKS]
    return specs


def coarse_to_fine(budgets: list[int]) -> list[int]:
    """The budgets in bisection order (middle, largest, smallest, then midpoints): any prefix spans the range."""
    budgets = sorted(budgets)
    if len(budgets) <= 2:
        return budgets
    order, spans = [budgets[len(budgets) // 2], budgets[-1], budgets[0]], [(0, len(budgets) // 2),
                                                                         (len(budgets) // 2, len(budgets) - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(budgets[mid])
            spans += [(lo, mid), (mid, hi)]
    return order


def lr_pick_specs(model_name: str, task_name: str, mode: Mode) -> list[RunSpec]:
    base = RunSpec(model_name, task_name, "apet", 0, mode.steps[model_name], PAPER_LR, structure="delta",
                   budget=LR_PICK_BUDGET, max_len=mode.max_len, batch_size=mode.batch_size)
    return [replace(base, mask=m, lr=lr) for m in MASKS for lr in mode.lr_candidates]


def sweep(mode: Mode, out: Path, log: Callable[[str], None], command: str = "", part: str = "paper",
          device: str = "cpu", run_models: tuple[str, ...] | None = None,
          run_seeds: tuple[int, ...] | None = None, run_masks: tuple[str, ...] | None = None) -> dict:
    """Run one part of the sweep (resuming from `<out>/runs/`); returns the plan, also written to `<out>/plan.json`.

    Part "paper" plans `runs` (the lr pick, then Figures 5-7); parts "pairing" and "sizes" plan `pairing_runs` /
    `sizes_runs` and keep what the plan file already says about the other parts. All pick the lr first (runs
    already stored are reused). `run_models` / `run_seeds` / `run_masks` run only those models' / seeds' / masks'
    runs of the part (not the lr pick's; the plan still lists every run), so processes can share a sweep."""
    store = Store(out)
    tasks: dict[tuple[str, str], Task] = {}

    def to_run(specs: list[RunSpec]) -> list[RunSpec]:
        return [s for s in specs if (run_models is None or s.model in run_models)
                and (run_seeds is None or s.seed in run_seeds)
                and (run_masks is None or s.mask in run_masks)]

    def get_task(model: str, task: str) -> Task:
        if (model, task) not in tasks:
            tasks[model, task] = harness.load_model_task(model, task, max_len=mode.max_len, test_size=mode.test_size,
                                                          subset=64 if mode.name == "smoke" else None,
                                                          device=device)
        return tasks[model, task]

    # The lr of masked APET entries is picked once, on the first model and task, by validation accuracy, and
    # reused for every model and task (repeating it for the 135M LM costs more than a CPU sweep can spend).
    first_model, first_task = mode.models[0], mode.tasks[0]
    picks = lr_pick_specs(first_model, first_task, mode)
    old = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
    if part != "paper":
        plan = {"mode": mode.name, "command": "", "lr_pick": {}, "runs": [s.key for s in picks],
                **{k: v for k, v in old.items() if k not in (f"{part}_command", f"{part}_runs")},
                f"{part}_command": command, f"{part}_runs": []}
    else:
        plan = {**{k: v for k, v in old.items() if k.startswith(("pairing_", "sizes_"))},
                "mode": mode.name, "command": command, "lr_pick": {}, "runs": [s.key for s in picks]}
    harness.write_json(out / "plan.json", plan)
    records = run_all(picks, store, get_task, mode, log)
    lrs = {m: pick_lr(records, m) for m in MASKS}
    plan["lr_pick"] = {m: {"lr": lrs[m], "budget": LR_PICK_BUDGET, "model": first_model, "task": first_task,
                           "validation": {f"{r['lr']:g}": r["validation"]["accuracy"] for r in records
                                          if r["mask"] == m}} for m in MASKS}
    log(f"lr picked on validation: {lrs}")
    if part != "paper":
        specs = [s for t in mode.tasks[:1] for s in plan_sizes(t, mode, get_task, lrs)] if part == "sizes" else \
            [s for t in mode.tasks for s in plan_pairing(mode.models[0], t, mode, lrs)]
        plan[f"{part}_runs"] = [s.key for s in specs]
        harness.write_json(out / "plan.json", plan)
        if part == "pairing":
            count_learnable(specs, get_task, out)
        run_all(to_run(specs), store, get_task, mode, log)
        return plan
    specs = [s for t in mode.tasks for m in mode.models for s in plan_model(m, t, mode, get_task(m, t), lrs)]
    # Seed 0 of every model and task first, the LM after the encoder: a cut sweep keeps whole curves.
    specs = sorted(dict.fromkeys(specs), key=lambda s: (s.seed, s.model == "smollm2"))
    plan["runs"] += [s.key for s in specs if s.key not in plan["runs"]]
    harness.write_json(out / "plan.json", plan)
    run_all(to_run(specs), store, get_task, mode, log)
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "paper_findings", smoke="tiny random BERT, two budgets, two steps",
                               full="the full grid (3 seeds, both tasks, more budgets)",
                               report_only="only rebuild tables and plots")
    parser.add_argument("--part", choices=PARTS, default="paper",
                        help="paper: the Figures 5-7 sweep; pairing: masked lora/adapter with independent vs "
                             "aligned masks (the first model, seeds and budgets of the mode's pairing_* fields); "
                             "sizes: Figure 7 on each of the mode's size_models (size_* fields, first task)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where models train (cuda: one GPU; the CPU threads option still applies to data)")
    parser.add_argument("--with-lm", action="store_true",
                        help="add SmolLM2-135M (zero-shot and delta at 1600 entries) to the default sweep")
    parser.add_argument("--run-models", default=None,
                        help="comma-separated models (e.g. minilm): run only their runs of the part; the plan and "
                             "report keep every run, so two processes can share a sweep")
    parser.add_argument("--run-seeds", default=None, type=lambda v: tuple(int(s) for s in v.split(",")),
                        help="comma-separated seeds (e.g. 1): run only their runs of the part, like --run-models")
    parser.add_argument("--run-masks", default=None, type=lambda v: tuple(v.split(",")),
                        help=f"comma-separated masks ({', '.join(MASKS)}): run only the masked runs with these masks "
                             "(unmasked runs such as head and full are skipped), like --run-models")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here (torch.cuda.is_available() is False)")
    if args.run_masks and not set(args.run_masks) <= set(MASKS):
        parser.error(f"--run-masks: {','.join(args.run_masks)} is not a subset of {', '.join(MASKS)}")
    mode = MODES["full" if args.full else "smoke" if args.smoke else "default"]
    if args.with_lm:
        if mode.name != "default":
            parser.error(f"--with-lm extends the default sweep; the {mode.name} mode has its own models")
        mode = replace(mode, models=(*mode.models, "smollm2"))
    out = args.out or harness.results_folder("paper_findings", mode.name)
    command = harness.start("paper_findings", argv, out, args.threads)
    log = harness.logger(out / "sweep.log")
    if not args.report_only:
        log(f"start {command} ({mode.name})")
        run_models = tuple(args.run_models.split(",")) if args.run_models else None
        sweep(mode, out, log, command, args.part, args.device, run_models, args.run_seeds, args.run_masks)
    records = Store(out).all()
    meta = report(out, command, records)
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
    meta["plots"] += [p.name for p in pairing_report(out, command, records, plan, meta)]
    log(f"report written to {out} ({len(meta['missing'])} planned runs missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
