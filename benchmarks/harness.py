"""What the benchmarks share: the task and its model, the training and evaluation loop, memory and machine facts,
result files and figure stamps, and the command-line preamble. Each script reads arguments -> grid -> run -> write
results with these pieces, and no script imports another.

Task (`load_model_task`): a labelled text task of `examples.apet_data`, tokenized for one model. Encoders
(all-MiniLM-L6-v2, or a tiny random BERT with its tokenizer for smoke runs) classify with a head
(`kind="seq_cls"`, PEFT `task_type="SEQ_CLS"`). SmolLM2-135M-Instruct classifies by generating one token
(`kind="label_words"`): the prompt "Review: <text>\\nSentiment:" is trained with the cross-entropy of the label
word (" negative" / " positive") over the full vocabulary at the last position, and predictions take the larger
of the two label-word logits (no new head).

Memory (`PeakSampler`): on CPU the largest resident set size seen by a 5 ms background sampler of
/proc/self/statm; `trim_memory` hands freed memory back to the OS (glibc `malloc_trim`) before a measurement.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import peft_apet
from examples.apet_metrics import accuracy, macro_f1

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LM_TEMPLATE = "Review: {text}\nSentiment:"
LABEL_WORDS = {"rotten_tomatoes": (" negative", " positive"), "fine_food": (" other", " great")}
Example = tuple[list[int], int]  # (token ids, label)


# ---------------------------------------------------------------------------------------------- task and model
@dataclass
class Task:
    """A tokenized task for one model: splits of (token ids, label); `kind` is "seq_cls" or "label_words"."""

    model: str
    kind: str
    path: str  # the folder `from_pretrained` opens
    splits: dict[str, list[Example]]
    num_labels: int
    pad_id: int
    label_token_ids: list[int] = field(default_factory=list)  # label_words: the first token of each label word
    tiny_config: object | None = None  # a random model of this config instead of the pretrained one
    device: str = "cpu"  # where `new_model` puts the model and `collate` the batches


def tiny_bert_config(vocab_size: int):
    """BERT with hidden 32, 2 layers, feed-forward 64 and 2 labels: the model of the smoke runs."""
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=vocab_size, max_position_embeddings=128, num_labels=2)


def load_model_task(model: str, task: str, *, max_len: int, test_size: int, subset: int | None = None,
                    device: str = "cpu") -> Task:
    """Tokenize `task` for `model` ("minilm", "mpnet", "tiny-bert" or "smollm2").

    Args:
        max_len: tokens kept of each text (for the LM, before the template is added).
        test_size: the test split is cut to its first `test_size` examples (a stratified prefix).
        subset: every split first cut to its first `subset` examples (smoke runs).
        device: "cpu" or "cuda": where the task's models and batches live.
    """
    from transformers import AutoTokenizer

    from examples.apet_data import load_task
    from examples.apet_models import minilm_path, mpnet_path, smollm2_path

    data = load_task(task, seed=0)
    if subset is not None:
        data = {name: split.select(range(min(len(split), subset))) for name, split in data.items()}
    data = dict(data)
    data["test"] = data["test"].select(range(min(test_size, len(data["test"]))))
    num_labels = data["train"].features["label"].num_classes
    path = {"smollm2": smollm2_path, "mpnet": mpnet_path}.get(model, minilm_path)()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model != "smollm2":
        splits = {name: [(tokenizer(t, truncation=True, max_length=max_len)["input_ids"], y)
                         for t, y in zip(split["text"], split["label"])] for name, split in data.items()}
        tiny = tiny_bert_config(tokenizer.vocab_size) if model == "tiny-bert" else None
        return Task(model, "seq_cls", path, splits, num_labels, tokenizer.pad_token_id, tiny_config=tiny,
                    device=device)
    prefix, suffix = LM_TEMPLATE.split("{text}")
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    words = LABEL_WORDS[task]
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"label words {words} share their first token")
    splits = {name: [(head + tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] + tail, y)
                     for t, y in zip(split["text"], split["label"])] for name, split in data.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Task(model, "label_words", path, splits, num_labels, pad, label_token_ids=label_ids, device=device)


def new_model(task: Task) -> nn.Module:
    """A fresh pretrained model on `task.device` (the seed of the classifier head comes from the caller's torch
    seed)."""
    return _new_model(task).to(task.device)


def _new_model(task: Task) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "classifier newly initialised" report on every run
    if task.tiny_config is not None:
        return BertForSequenceClassification(task.tiny_config)
    if task.kind == "label_words":
        return AutoModelForCausalLM.from_pretrained(task.path, dtype=torch.float32)
    if task.model == "mpnet":
        return PooledClassifier(task.path, task.num_labels)
    return AutoModelForSequenceClassification.from_pretrained(task.path, num_labels=task.num_labels)


class PooledClassifier(nn.Module):
    """MPNet with BERT's classification head: the pretrained pooler (dense + tanh on the first token, frozen under
    PEFT like MiniLM's) and a new linear `classifier`, so that the two encoders train heads of the same kind
    (MPNet's own `MPNetForSequenceClassification` trains a new 768 x 768 dense layer as well: 590k head entries)."""

    def __init__(self, path: str, num_labels: int):
        from transformers import MPNetModel

        super().__init__()
        self.mpnet = MPNetModel.from_pretrained(path, add_pooling_layer=True)
        self.config = self.mpnet.config
        self.config.num_labels = num_labels
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled = self.mpnet(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def task_type(task: Task) -> str:
    """PEFT's task type of the task's model."""
    return "SEQ_CLS" if task.kind == "seq_cls" else "CAUSAL_LM"


def is_head(name: str) -> bool:
    """Parameters of the classification head (trained in full as PEFT `modules_to_save` for SEQ_CLS)."""
    return any(part in ("classifier", "score") for part in name.split("."))


# ---------------------------------------------------------------------------------------------- training and evaluation
def calibration_batches(task: Task, batch_size: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` collated training batches for mask calibration, from a stream seeded `seed + 10_000` (apart from the
    training stream of the same seed): the same batches for every data-driven strategy of a seed."""
    stream = batches(task.splits["train"], batch_size, seed + 10_000)
    return [collate(next(stream), task) for _ in range(count)]


def batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless shuffled batches, reshuffled every epoch with a seeded generator (a last short batch is dropped)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def collate(examples: list[Example], task: Task) -> dict[str, torch.Tensor]:
    """`(batch, longest)` ids and attention mask, `(batch,)` labels. Padded on the right for encoders, on the left
    for the LM (its last position is the answer slot)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), task.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (tokens, _) in enumerate(examples):
        span = slice(0, len(tokens)) if task.kind == "seq_cls" else slice(width - len(tokens), width)
        ids[row, span] = torch.tensor(tokens)
        mask[row, span] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in examples])}
    return {name: t.to(task.device) for name, t in batch.items()}


def vocab_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: Task, has_prompt: bool) -> torch.Tensor:
    """`(batch, classes)` logits for encoders; `(batch, vocab)` next-token logits at the last position for the LM."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task.kind == "seq_cls":
        return model(**inputs).logits
    if not has_prompt:  # left padding: number the real tokens from 0 (a prompt renumbers the sequence itself)
        inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**inputs, logits_to_keep=1).logits[:, -1]


def loss_and_scores(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (over the full vocabulary for the LM: the label word is generated) and `(batch, classes)`
    class scores."""
    if task.kind == "seq_cls":
        return F.cross_entropy(logits, labels), logits
    label_ids = torch.tensor(task.label_token_ids, device=logits.device)
    return F.cross_entropy(logits, label_ids[labels]), logits[:, label_ids]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], task: Task,
               has_prompt: bool = False, set_to_none: bool = True) -> float:
    """Forward, backward, optimizer step and zero_grad on one collated batch; returns the loss."""
    loss, _ = loss_and_scores(vocab_logits(model, batch, task, has_prompt), batch["labels"], task)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return loss.item()


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, steps: int, batch_size: int,
                seed: int, has_prompt: bool = False,
                after_step: Callable[[int], None] = lambda step: None) -> list[float]:
    """`steps` optimizer steps on the seed's stream of training batches (`batches`); `after_step(step)` runs after
    each (1-based), e.g. to score a learning curve. Returns the loss of each step."""
    stream = batches(task.splits["train"], batch_size, seed)
    losses = []
    for step in range(1, steps + 1):
        losses.append(train_step(model, optimizer, collate(next(stream), task), task, has_prompt))
        after_step(step)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], task: Task, has_prompt: bool, batch_size: int = 64) -> dict:
    """Accuracy and macro-F1 of the class scores; for the LM also generation accuracy (the full-vocabulary argmax
    is the label word). Leaves the model in training mode."""
    model.eval()
    predictions, generated, labels = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], task)
        logits = vocab_logits(model, batch, task, has_prompt)
        _, scores = loss_and_scores(logits, batch["labels"], task)
        predictions += scores.argmax(-1).tolist()
        labels += batch["labels"].tolist()
        if task.kind == "label_words":
            words = torch.tensor(task.label_token_ids, device=logits.device)
            generated += (logits.argmax(-1) == words[batch["labels"]]).tolist()
    model.train()
    out = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    if generated:
        out["generation_accuracy"] = float(np.mean(generated))
    return out


def nearest_rank(per_rank: int, k: int) -> tuple[int, int]:
    """The rank r >= 1 whose LoRA-style count r * per_rank (per_rank = sum of m + n over the targets) is nearest
    `k`, and that count."""
    r = max(1, round(k / per_rank))
    return r, r * per_rank


# ---------------------------------------------------------------------------------------------- memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def available_memory(device: str = "cpu") -> int:
    """Bytes new tensors can take: CUDA's free memory on `device`, else the kernel's MemAvailable (free memory plus
    the page cache it can reclaim; `os.sysconf`'s free pages, without the cache, where /proc is missing)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def full_ft_fits(num_params: int, device: str, floor_peak: int | None = None) -> tuple[bool, str]:
    """Whether full fine-tuning of `num_params` parameters fits now, and why (for the log): a measured step of the
    frozen model (`floor_peak` bytes: the model copy and the activations) plus 12 B per parameter (fp32 gradients
    and two AdamW moments), within `available_memory(device)`; without a floor measurement, 16 B per parameter
    + 2 GiB."""
    need = floor_peak + 12 * num_params if floor_peak else 16 * num_params + 2 * 2**30
    free = available_memory(device)
    return need < free, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: psutil if there, else the (monotone) peak
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_memory() -> None:
    """Collect garbage and give memory that glibc keeps after a free back to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 1 << 20  # bytes: glibc's mmap threshold of memory measurements (`fix_mmap_threshold`, `run_fresh`)
# seconds: a fresh-process measurement running longer than this is taken to have hung (`run_fresh`).
RUN_FRESH_TIMEOUT_S = 3600.0


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for the rest of the process (as `MALLOC_MMAP_THRESHOLD_` would at
    start): allocations above it are mapped and unmapped on free, so RSS follows live memory instead of where glibc
    kept earlier frees (by default it raises the threshold after each large free). False where glibc is absent."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def run_fresh(module: str, args: list[str], timeout_s: float = RUN_FRESH_TIMEOUT_S) -> dict:
    """Run `python -m benchmarks.<module> <args> --record FILE` in a fresh process with glibc's mmap threshold fixed
    at `MMAP_THRESHOLD` (`MALLOC_MMAP_THRESHOLD_`), so that no measurement inherits another's freed-but-kept memory;
    returns the JSON record the process wrote to FILE. A failing process raises with the end of its stderr; one that
    runs past `timeout_s` seconds is killed and raises."""
    return run_recorded([sys.executable, "-m", f"benchmarks.{module}", *args], timeout_s)


def run_recorded(command: list[str], timeout_s: float = RUN_FRESH_TIMEOUT_S) -> dict:
    """`run_fresh` for any command: runs `command + ["--record", FILE]` from the repository root and returns FILE's
    JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        try:
            proc = subprocess.run([*command, "--record", str(record)], capture_output=True, text=True, cwd=REPO,
                                  env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"{' '.join(command)} ran past {timeout_s:g} s and was stopped") from error
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(record.read_text())


class SavedForBackward:
    """Context manager: `bytes` is the size of the distinct storages autograd saves for backward inside the block,
    the memory held between forward and backward independent of the allocator; storages of `exclude` (e.g. the
    model's parameters, which exist anyway) are not counted."""

    def __init__(self, exclude: list[torch.Tensor] = ()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.sparse_coo:
            parts = [t._indices(), t._values()]
        elif t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
            compressed = t.crow_indices() if t.layout in (torch.sparse_csr, torch.sparse_bsr) else t.ccol_indices()
            plain = t.col_indices() if t.layout in (torch.sparse_csr, torch.sparse_bsr) else t.row_indices()
            parts = [compressed, plain, t.values()]
        else:
            parts = [t]
        for part in parts:
            ptr = part.untyped_storage().data_ptr()
            if ptr not in self._skip:
                self._storages.setdefault(ptr, part.untyped_storage().nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedForBackward:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class TensorPeak:
    """Context manager (when `on`): `peak` is the largest number of tensor bytes allocated inside the block and not
    yet freed, from the torch profiler's memory events (CPU tensors): what the block itself needs at its worst
    moment, independent of the allocator, where RSS also counts what glibc keeps after a free (None when off or
    where the profiler gives no memory events). Reads the profiler's `kineto_results`, a private attribute."""

    def __init__(self, on: bool = True):
        self.on, self.peak = on, None

    def __enter__(self) -> TensorPeak:
        if self.on:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.on:
            return
        self._prof.__exit__(*exc)
        events = getattr(self._prof.profiler, "kineto_results", None)
        memory = sorted((e.start_ns(), e.nbytes()) for e in (events.events() if events else ()) if
                        e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in memory:
            live += nbytes
            peak = max(peak, live)
        self.peak = peak if memory else None


class PeakSampler:
    """Context manager: `peak` is the largest RSS (bytes) seen every `interval` seconds inside the block."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def trainable_state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of the trainable parameters, their gradients and the optimizer state, read from the tensors."""
    param_b = sum(p.numel() * p.element_size() for p in params)
    grad_b = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt_b = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return {"params": param_b, "grads": grad_b, "optimizer": opt_b, "total": param_b + grad_b + opt_b,
            "param_tensors": len(params)}


# ---------------------------------------------------------------------------------------------- machine
def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict:
    """CPU, cores, threads, library versions, CUDA device and load average, as results files record them."""
    import peft
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": usable_cores(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "peft_apet": peft_apet.__version__,
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.release()}",
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def machine_line() -> str:
    """The machine in one line, as the reports of paper_findings and mask_selection print it."""
    m = machine()
    return (f"{platform.machine()} {platform.processor() or ''} {m['cores']} usable cores (torch threads "
            f"{m['torch_threads']}), {m['platform']}, Python {m['python']}, torch {m['torch']}, transformers "
            f"{m['transformers']}, peft {m['peft']}, peft-apet {m['peft_apet']}").replace("  ", " ")


def now() -> str:
    """The local time to the second, as results files stamp it."""
    return datetime.datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- files and figures
def write_json(path: Path, data: object, end: str = "") -> None:
    """`data` as JSON indented by 1 (values JSON cannot hold written with `str`), then `end`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + end)


def load_records(path: Path, skip_cut_lines: bool = False) -> list[dict]:
    """The records of a JSON-lines file (`[]` if it does not exist), blank lines skipped; with `skip_cut_lines`,
    also a line cut short by an interrupted write (else that raises `json.JSONDecodeError`)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not skip_cut_lines:
                raise
    return records


def append_record(path: Path, record: dict) -> None:
    """`record` as one JSON line, written as soon as its run finished so that a rerun skips it; one write of one
    line, so it is safe beside another process appending to the same file."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """One line per row with `columns` (keys of a row not among them are left out)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def logger(path: Path, append: bool = True) -> Callable[[str], None]:
    """A `log(message)` that prints a time-stamped line and writes it to `path` at once (appended, or the file
    started afresh)."""
    log_file = path.open("a" if append else "w")

    def log(message: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def stamp(date: str, command: str, cores: int | None = None) -> str:
    """The line printed at the foot of every figure: when, on how many cores, which torch, which command."""
    return f"{date} · {cores or usable_cores()} CPU cores · torch {torch.__version__} · {command}"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, stamp_line: str, bottom: float = 0.04) -> Path:
    """Lay `fig` out above a strip of height `bottom` (figure fraction), print the stamp there, save as PNG."""
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.text(0.01, 0.01, stamp_line, fontsize=5, color="dimgrey")
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------- command line
def arguments(doc: str, module: str, *, smoke: str, full: str | None = None, report_only: str | None = None,
              threads: int | None = 2) -> argparse.ArgumentParser:
    """The options every benchmark shares: `--smoke` (and `--full`, exclusive with it), `--out` (default
    `results_folder(module)`), `--report-only` where the script can rebuild its report from stored records, and
    `--threads` (None: no option, torch's default). The description is the first paragraph of the script's
    docstring `doc`."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = results_folder(module)
    size = parser.add_mutually_exclusive_group() if full else parser
    if full:
        size.add_argument("--full", action="store_true", help=full)
    size.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {default_out})")
    if report_only:
        parser.add_argument("--report-only", action="store_true", help=report_only)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    return parser


def results_folder(name: str, mode: str = "default") -> Path:
    """`benchmarks/results/<name>` for the default size, `benchmarks/results/<name>_<mode>` for the others."""
    return RESULTS / (name if mode == "default" else f"{name}_{mode}")


def command(module: str, argv: list[str] | None) -> str:
    """The shell command that reruns this invocation of `benchmarks.<module>` from the repository root."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(argv if argv is not None else sys.argv[1:])])


def start(module: str, argv: list[str] | None, out: Path, threads: int | None) -> str:
    """Create `out`, set torch's CPU threads (None: leave them) and return the command of this run."""
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    return command(module, argv)
