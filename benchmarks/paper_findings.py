"""Reproduce the APET paper's ablations (§5.2-5.3, Figures 5-7) on real weights with peft-apet.

One command runs the sweep, checkpoints every run and writes the report::

    python benchmarks/paper_findings.py                       # default: MiniLM, 26 runs, about 80 min on 2 CPU cores
    python benchmarks/paper_findings.py --with-lm             # default plus SmolLM2-135M (3 runs, about 35 min more)
    python benchmarks/paper_findings.py --full                # the full grid (3 seeds, both tasks, more budgets)
    python benchmarks/paper_findings.py --smoke --out /tmp/x  # tiny random BERT, 2 budgets, 2 steps (the test)
    python benchmarks/paper_findings.py --report-only         # rebuild tables and plots from finished runs

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

Models: all-MiniLM-L6-v2 (22.7M BERT) with a sequence-classification head (`task_type="SEQ_CLS"`, so PEFT trains
the head as a `modules_to_save`; its entries are reported apart from the APET budget), and SmolLM2-135M-Instruct
doing classification as one-token generation: the prompt "Review: <text>\\nSentiment:" is trained with the
cross-entropy of the label word (" negative" / " positive") over the full vocabulary at the last position, and
predictions take the larger of the two label-word logits (no new head, so every trained entry is an APET entry).

Every finished run is one JSON file in `<out>/runs/`; a rerun skips them, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import peft_apet  # noqa: E402
from peft_apet import APETConfig, count_trainable_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from apet_data import load_task  # noqa: E402
from apet_metrics import accuracy, macro_f1  # noqa: E402
from apet_models import minilm_path, smollm2_path  # noqa: E402

SWEEP_COMMANDS = {"default": "nice -n 15 python benchmarks/paper_findings.py",
                  "full": "nice -n 15 python benchmarks/paper_findings.py --full"}
DEFAULT_OUT = REPO / "benchmarks" / "results" / "paper_findings"
MASKS = ("adjacent", "discrete")
PET_PRESETS = ("prompt", "bitfit", "lora", "adapter")
FIG5_ORDER = ("lora", "bitfit", "adapter", "prompt")  # run order: the prompt (100 more tokens) costs most
# Paper, appendix B.3 / C.2: batch 32, lr 3e-4 without warm-up (3e-2 for soft prompts).
PAPER_LR = 3e-4
PROMPT_LR = 3e-2
FT_LR = 1e-4  # full fine-tuning; not given by the paper, not tuned here
LR_CANDIDATES = (3e-4, 3e-3)  # for masked APET entries, picked on the validation split
LR_PICK_BUDGET = 1600
FIG6_BUDGETS = (1600, 6400, 73728)  # panels of the convergence plot (the table has every budget)
LM_TEMPLATE = "Review: {text}\nSentiment:"
LABEL_WORDS = {"rotten_tomatoes": (" negative", " positive"), "fine_food": (" other", " great")}


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


MODES = {
    # Figure 7's delta curves also get the points of Figure 5's APET runs (at the BitFit, Prompt, LoRA and Adapter
    # counts: 2.6e4 to 2.2e5 on MiniLM), so the default grid stops at 6400, and 10 entries (most matrices get none)
    # and masked LoRA below 1600 are left to --full: the 26 MiniLM runs take about 80 minutes on 2 cores, with a
    # margin under the 90-minute goal. One SmolLM2 training run (60 steps) costs about 15 minutes on 2 cores, so
    # the LM joins the default only with --with-lm: zero-shot and one budget.
    "default": Mode(
        name="default", models=("minilm",), tasks=("rotten_tomatoes",),
        budgets=(100, 400, 1600, 6400), seeds=(0,),
        steps={"minilm": 125, "smollm2": 60}, lora_budgets=(1600,), lm_budgets=(1600,),
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
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run. `method` is "full" (fine-tuning), "head" (classifier only), "zero_shot" (no training),
    a PET preset ("prompt", "bitfit", "lora", "adapter") or "apet" (a masked `structure` with `budget` entries)."""

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

    @property
    def key(self) -> str:
        parts = [self.model, self.task, self.method, self.structure or "", self.mask or "",
                 str(self.budget or ""), f"lr{self.lr:g}", f"s{self.seed}", f"st{self.steps}", f"len{self.max_len}",
                 f"bs{self.batch_size}"]
        return "-".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------- data + models
@dataclass
class Task:
    """A tokenized task for one model: examples are (token ids, label); `kind` is "seq_cls" or "label_words"."""

    model: str
    kind: str
    path: str
    splits: dict[str, list[tuple[list[int], int]]]
    num_labels: int
    pad_id: int
    label_token_ids: list[int] = field(default_factory=list)
    tiny_config: object | None = None


def _tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=vocab_size, max_position_embeddings=128, num_labels=2)


def load_model_task(model: str, task: str, mode: Mode) -> Task:
    """Tokenize `task` for `model`; test is cut to `mode.test_size` (a stratified prefix)."""
    from transformers import AutoTokenizer

    data = load_task(task, seed=0)
    if mode.name == "smoke":
        data = {name: split.select(range(min(len(split), 64))) for name, split in data.items()}
    data = dict(data)
    data["test"] = data["test"].select(range(min(mode.test_size, len(data["test"]))))
    num_labels = data["train"].features["label"].num_classes
    path = smollm2_path() if model == "smollm2" else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model != "smollm2":
        splits = {name: [(tokenizer(t, truncation=True, max_length=mode.max_len)["input_ids"], y)
                         for t, y in zip(split["text"], split["label"])] for name, split in data.items()}
        tiny = _tiny_bert_config(tokenizer.vocab_size) if model == "tiny-bert" else None
        return Task(model, "seq_cls", path, splits, num_labels, tokenizer.pad_token_id, tiny_config=tiny)
    prefix, suffix = LM_TEMPLATE.split("{text}")
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    words = LABEL_WORDS[task]
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"label words {words} share their first token")
    splits = {name: [(head + tokenizer(t, add_special_tokens=False)["input_ids"][: mode.max_len] + tail, y)
                     for t, y in zip(split["text"], split["label"])] for name, split in data.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Task(model, "label_words", path, splits, num_labels, pad, label_token_ids=label_ids)


def new_model(task: Task) -> nn.Module:
    """A fresh pretrained model (the seed of the classifier head comes from the caller's torch seed)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "classifier newly initialised" report on every run
    if task.tiny_config is not None:
        return BertForSequenceClassification(task.tiny_config)
    if task.kind == "label_words":
        return AutoModelForCausalLM.from_pretrained(task.path, dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(task.path, num_labels=task.num_labels)


def task_type(task: Task) -> str:
    return "SEQ_CLS" if task.kind == "seq_cls" else "CAUSAL_LM"


def collate(examples: list[tuple[list[int], int]], task: Task) -> dict[str, torch.Tensor]:
    """Pad to the longest example: right for encoders, left for the LM (its last position is the answer slot)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), task.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (tokens, _) in enumerate(examples):
        span = slice(0, len(tokens)) if task.kind == "seq_cls" else slice(width - len(tokens), width)
        ids[row, span] = torch.tensor(tokens)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in examples])}


def vocab_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: Task, has_prompt: bool) -> torch.Tensor:
    """`(batch, classes)` logits for encoders; `(batch, vocab)` next-token logits at the last position for the LM."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task.kind == "seq_cls":
        return model(**inputs).logits
    if not has_prompt:  # left padding: number the real tokens from 0 (a prompt renumbers the sequence itself)
        inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**inputs, logits_to_keep=1).logits[:, -1]


def loss_and_scores(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (over the full vocabulary for the LM: the label word is generated) and class scores."""
    if task.kind == "seq_cls":
        return F.cross_entropy(logits, labels), logits
    label_ids = torch.tensor(task.label_token_ids)
    return F.cross_entropy(logits, label_ids[labels]), logits[:, label_ids]


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


def apet_config(structure: str, mask: str | None, budget: int | None, task: Task, seed: int) -> APETConfig:
    """A masked `delta` (attention + FFN weights) or `lora` (r=8, alpha=16, q/v) adapter with `budget` entries."""
    common = dict(task_type=task_type(task), seed=seed, mask=mask, num_trainable_params=budget)
    if structure == "delta":
        return APETConfig.delta(**common)
    if structure == "lora":  # the paper's independent A/B masks, as the committed results were measured
        return APETConfig.lora(r=8, lora_alpha=16, mask_pairing="independent", **common)
    raise ValueError(f"unknown structure {structure!r}")


def run_config(spec: RunSpec, task: Task) -> APETConfig | None:
    if spec.method == "apet":
        return apet_config(spec.structure, spec.mask, spec.budget, task, spec.seed)
    if spec.method in PET_PRESETS:
        return preset_config(spec.method, task, spec.seed)
    return None


# ---------------------------------------------------------------------------------------------- one run
def batches(examples: list, batch_size: int, seed: int) -> Iterator[list]:
    """Endless shuffled batches, reshuffled every epoch with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


@torch.no_grad()
def evaluate(model: nn.Module, examples: list, task: Task, has_prompt: bool, batch_size: int = 64) -> dict:
    """Accuracy and macro-F1 of the class scores; for the LM also generation accuracy (full-vocabulary argmax)."""
    model.eval()
    predictions, generated, labels = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], task)
        logits = vocab_logits(model, batch, task, has_prompt)
        _, scores = loss_and_scores(logits, batch["labels"], task)
        predictions += scores.argmax(-1).tolist()
        labels += batch["labels"].tolist()
        if task.kind == "label_words":
            generated += (logits.argmax(-1) == torch.tensor(task.label_token_ids)[batch["labels"]]).tolist()
    model.train()
    out = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    if generated:
        out["generation_accuracy"] = float(np.mean(generated))
    return out


def is_head(name: str) -> bool:
    """Parameters of the classification head (trained in full as PEFT `modules_to_save` for SEQ_CLS)."""
    return any(part in ("classifier", "score") for part in name.split("."))


def prepare(spec: RunSpec, task: Task) -> tuple[nn.Module, bool]:
    """The model of a run with exactly the parameters of its method left trainable; returns (model, has_prompt)."""
    torch.manual_seed(spec.seed)
    model = new_model(task)
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
    losses = []
    if spec.steps and spec.method != "zero_shot":
        optimizer = torch.optim.AdamW(param_groups(model, spec), weight_decay=0.0)
        stream = batches(task.splits["train"], spec.batch_size, spec.seed)
        for step in range(1, spec.steps + 1):
            batch = collate(next(stream), task)
            loss, _ = loss_and_scores(vocab_logits(model, batch, task, has_prompt), batch["labels"], task)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % mode.eval_every == 0 or step == spec.steps:
                curve.append((step, evaluate(model, curve_examples, task, has_prompt)["accuracy"]))
                log(f"  {spec.key} step {step}/{spec.steps}: curve accuracy {curve[-1][1]:.3f}")
    return {
        **asdict(spec), "key": spec.key, **counts, "num_labels": task.num_labels,
        "validation": evaluate(model, task.splits["validation"], task, has_prompt),
        "test": evaluate(model, task.splits["test"], task, has_prompt),
        "curve": curve, "loss_first": losses[:5], "loss_last": losses[-5:],
        "n_test": len(task.splits["test"]), "n_train": len(task.splits["train"]),
        "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
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
    probe = new_model(task)
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


def sweep(mode: Mode, out: Path, log: Callable[[str], None], command: str = "") -> dict:
    """Run the sweep (resuming from `<out>/runs/`); returns the plan, also written to `<out>/plan.json`."""
    store = Store(out)
    tasks: dict[tuple[str, str], Task] = {}

    def get_task(model: str, task: str) -> Task:
        if (model, task) not in tasks:
            tasks[model, task] = load_model_task(model, task, mode)
        return tasks[model, task]

    # The lr of masked APET entries is picked once, on the first model and task, by validation accuracy, and
    # reused for every model and task (repeating it for the 135M LM costs more than a CPU sweep can spend).
    first_model, first_task = mode.models[0], mode.tasks[0]
    picks = lr_pick_specs(first_model, first_task, mode)
    plan = {"mode": mode.name, "command": command, "lr_pick": {}, "runs": [s.key for s in picks]}
    _write_json(out / "plan.json", plan)
    records = run_all(picks, store, get_task, mode, log)
    lrs = {m: pick_lr(records, m) for m in MASKS}
    plan["lr_pick"] = {m: {"lr": lrs[m], "budget": LR_PICK_BUDGET, "model": first_model, "task": first_task,
                           "validation": {f"{r['lr']:g}": r["validation"]["accuracy"] for r in records
                                          if r["mask"] == m}} for m in MASKS}
    log(f"lr picked on validation: {lrs}")
    specs = [s for t in mode.tasks for m in mode.models for s in plan_model(m, t, mode, get_task(m, t), lrs)]
    # Seed 0 of every model and task first, the LM after the encoder: a cut sweep keeps whole curves.
    specs = sorted(dict.fromkeys(specs), key=lambda s: (s.seed, s.model == "smollm2"))
    plan["runs"] += [s.key for s in specs if s.key not in plan["runs"]]
    _write_json(out / "plan.json", plan)
    run_all(specs, store, get_task, mode, log)
    return plan


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


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
    losers and are left out.
    """
    records = [r for r in records if r["method"] != "apet" or r["lr"] == lrs.get(r["mask"], r["lr"])]
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


def markdown(analysis: dict, plan: dict, records: list[dict], meta: dict) -> str:
    """The results document: settings, Figure 7 table and thresholds, Figure 5 and Figure 6 tables, gaps."""
    done = {r["key"] for r in records}
    missing = [k for k in plan.get("runs", []) if k not in done]
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
    if missing:
        lines += ["## Missing runs (planned, not finished)", ""] + [f"- `{k}`" for k in missing] + [""]
    return "\n".join(lines)


def plots(analysis: dict, out: Path, stamp: str) -> list[Path]:
    """Figure 7, 5 and 6 style PNGs per (model, task, metric), each stamped with date, machine and command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            written.append(_save(fig, out / f"fig7_{tag}.png", stamp))
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
            written.append(_save(fig, out / f"fig5_{tag}.png", stamp))
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
            written.append(_save(fig, out / f"fig6_{tag}.png", stamp))
    return written


def _save(fig, path: Path, stamp: str) -> Path:
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.01, 0.01, stamp, fontsize=5, color="dimgrey")
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def machine() -> str:
    import peft
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.machine()} {platform.processor() or ''} {cores} usable cores (torch threads "
            f"{torch.get_num_threads()}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, peft-apet {peft_apet.__version__}").replace("  ", " ")


def write_csv(records: list[dict], path: Path) -> None:
    columns = ["key", "model", "task", "method", "structure", "mask", "budget", "seed", "lr", "steps", "max_len",
               "batch_size", "trainable_apet", "trainable_head", "test_accuracy", "test_macro_f1",
               "test_generation_accuracy", "validation_accuracy", "wall_s", "cpu_s", "finished"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in records:
            row = {c: r.get(c) for c in columns}
            row.update(test_accuracy=r["test"]["accuracy"], test_macro_f1=r["test"]["macro_f1"],
                       test_generation_accuracy=r["test"].get("generation_accuracy"),
                       validation_accuracy=r["validation"]["accuracy"])
            writer.writerow(row)


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


def report(out: Path, command: str) -> dict:
    """Rebuild `results.md`, `runs.csv`, `summary.json` and the PNGs from the run files in `out`."""
    store = Store(out)
    records = store.all()
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {"runs": []}
    lrs = {m: p["lr"] for m, p in plan.get("lr_pick", {}).items()}
    analysis = analyse(records, lrs)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "command": command,
            "cpu_hours": sum(r["cpu_s"] for r in records) / 3600,
            "missing": [k for k in plan.get("runs", []) if k not in {r["key"] for r in records}]}
    write_csv(records, out / "runs.csv")
    (out / "results.md").write_text(markdown(analysis, plan, records, meta))
    _write_json(out / "summary.json", {"meta": meta, "lr_pick": plan.get("lr_pick"), "analysis": _jsonable(analysis)})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    stamp = f"{meta['date']} · {cores} CPU cores · torch {torch.__version__} · {command}"
    meta["plots"] = [str(p.name) for p in plots(analysis, out, stamp)]
    return meta


def sweep_logger(out: Path) -> Callable[[str], None]:
    """A `log(message)` that prints a time-stamped line and appends it to `out / "sweep.log"` at once."""
    log_file = (out / "sweep.log").open("a")

    def log(message: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full grid (3 seeds, both tasks, more budgets)")
    size.add_argument("--smoke", action="store_true", help="tiny random BERT, two budgets, two steps")
    parser.add_argument("--with-lm", action="store_true",
                        help="add SmolLM2-135M (zero-shot and delta at 1600 entries) to the default sweep")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables and plots")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    mode = MODES["full" if args.full else "smoke" if args.smoke else "default"]
    if args.with_lm:
        if mode.name != "default":
            parser.error(f"--with-lm extends the default sweep; the {mode.name} mode has its own models")
        mode = replace(mode, models=(*mode.models, "smollm2"))
    out = args.out or (DEFAULT_OUT if mode.name == "default" else DEFAULT_OUT.parent / f"paper_findings_{mode.name}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/paper_findings.py", *(argv if argv is not None else sys.argv[1:])])
    log = sweep_logger(out)
    if not args.report_only:
        log(f"start {command} ({mode.name})")
        sweep(mode, out, log, command)
    meta = report(out, command)
    log(f"report written to {out} ({len(meta['missing'])} planned runs missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
