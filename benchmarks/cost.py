"""Training and inference cost of APET against full fine-tuning, PEFT LoRA, SHiRA and prompt tuning.

One command measures everything in one process and writes the report::

    python benchmarks/cost.py                      # default: BERT-base + Llama-0.5B, 1B memory check (~30 min)
    python benchmarks/cost.py --full               # every k on BERT-base and the 1B Llama, more repeats
    python benchmarks/cost.py --smoke --out /tmp/x # tiny models, two budgets, two steps (the test)
    python benchmarks/cost.py --report-only        # rebuild the report from results.json (+ discussion.md)

On a machine whose cores are shared with other jobs, pass `--threads 1`: two OpenMP threads that wait for each
other's time slices made steps 2-40x slower there (the results in benchmarks/results/cost were taken so).

For the same model, batch and sequence length, each method is built on a fresh copy of the same base weights
(copied from one in-memory state dict), trained for warm-up + measured steps (forward + backward + AdamW step +
zero_grad), saved, merged and unloaded. Methods are interleaved: every round runs every method once, and a method's
step time is the median of its measured steps over all rounds. Measured per method:

- step time (median, ms) and its ratio to PEFT LoRA (r=8, all linear layers) of the same run;
- peak memory: on CPU the largest resident set size (RSS) seen by a 5 ms background sampler of /proc/self/statm
  during injection and all steps, minus the RSS just before injection (the base model is already built then);
  memory that glibc returns is given back with malloc_trim before each method. On CUDA, peak allocated / reserved;
- trainable state: bytes of trainable parameters + their gradients + AdamW state (moments and step counters),
  read from the tensors after the last step;
- adapter file: bytes of `adapter_model.safetensors` written by `save_pretrained`, per trainable parameter,
  and the tensor payload alone (the file less its JSON header);
- merged inference: after `merge_and_unload`, forward passes (no grad) of the merged model alternated with those
  of a fresh base model; the ratio of their medians;
- mask construction: the time `build_mask` takes for every linear layer of the 1B decoder at k = 10^5, and the
  whole injection (`get_peft_model`).

The sparse methods run at equal trainable counts: APET adjacent and discrete get exactly k; PEFT LoRA and SHiRA
get the rank r whose count r * sum(m + n) over the same targets is nearest k (r >= 1; the count is reported), and
APET additionally runs at exactly SHiRA's r=1 count, so one point compares them at equal k. Speed and memory are
reported, never asserted (see benchmarks/results/cost/results.md for the targets and what was met).
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
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, PromptTuningConfig, ShiraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import peft_apet  # noqa: E402
from peft_apet import APETConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cost"
REFERENCE = "peft-lora"  # every ratio is to this method (r=8 on all linear layers) of the same model and run


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "bert" (encoder, FEATURE_EXTRACTION) or "llama" (decoder, CAUSAL_LM)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    batch: int
    seq: int

    @property
    def targets(self) -> list[str]:
        """Every linear layer of attention and MLP (BertModel is built without its pooler)."""
        if self.kind == "bert":
            return ["query", "key", "value", "dense"]
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    @property
    def task_type(self) -> str:
        return "FEATURE_EXTRACTION" if self.kind == "bert" else "CAUSAL_LM"


MODELS = {
    "bert-base": ModelSpec("bert-base", "bert", 768, 12, 3072, 12, 30522, batch=1, seq=64),
    "llama-0.5b": ModelSpec("llama-0.5b", "llama", 1536, 16, 4096, 12, 32000, batch=1, seq=32),
    "llama-1b": ModelSpec("llama-1b", "llama", 2048, 16, 5632, 16, 32000, batch=1, seq=32),
    "tiny-bert": ModelSpec("tiny-bert", "bert", 32, 2, 64, 2, 100, batch=2, seq=8),
    "tiny-llama": ModelSpec("tiny-llama", "llama", 32, 2, 64, 2, 100, batch=2, seq=8),
}


@dataclass(frozen=True)
class Run:
    """One model measured in one way: `grid` (every method, every k) or `memory` (SHiRA vs APET at equal k)."""

    model: str
    what: str  # "grid" or "memory"
    ks: tuple[int, ...] = ()
    rounds: int = 1
    warmup: int = 1
    measured: int = 5  # per round
    infer_reps: int = 5
    full_ft: bool = True


@dataclass(frozen=True)
class Mode:
    name: str
    runs: tuple[Run, ...]
    mask_model: str  # model whose linear layers the mask construction is timed on
    mask_k: int = 100_000
    mask_reps: int = 3


K_GRID = (1_000, 10_000, 100_000, 1_000_000)
MODES = {
    "smoke": Mode("smoke", (Run("tiny-bert", "grid", (100, 1000), warmup=1, measured=1, infer_reps=1),
                            Run("tiny-llama", "grid", (100, 1000), warmup=1, measured=1, infer_reps=1),
                            Run("tiny-llama", "memory", warmup=1, measured=1, infer_reps=1)),
                  mask_model="tiny-llama", mask_k=1000, mask_reps=1),
    # Sized on 2 CPU cores shared with another job, --threads 1 (a 0.5B decoder step is ~1.3 s): ~25 min.
    "default": Mode("default", (Run("bert-base", "grid", K_GRID, rounds=2, measured=3, infer_reps=7),
                                Run("llama-0.5b", "grid", K_GRID, rounds=2, measured=3, infer_reps=5),
                                Run("llama-1b", "memory", warmup=1, measured=2, infer_reps=0)),
                    mask_model="llama-1b"),
    "full": Mode("full", (Run("bert-base", "grid", K_GRID, rounds=3, measured=5),
                          Run("llama-0.5b", "grid", K_GRID, rounds=2, measured=5),
                          Run("llama-1b", "grid", K_GRID, rounds=2, measured=3, infer_reps=3)),
                 mask_model="llama-1b"),
}


# ---------------------------------------------------------------------------------------------- models
def build_model(spec: ModelSpec, device: str = "meta") -> nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        if spec.kind == "bert":
            config = BertConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                                intermediate_size=spec.intermediate, vocab_size=spec.vocab,
                                max_position_embeddings=max(512, spec.seq + 64))
            return BertModel(config, add_pooling_layer=False)
        config = LlamaConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.heads, intermediate_size=spec.intermediate,
                             vocab_size=spec.vocab, max_position_embeddings=max(512, spec.seq + 64))
        return LlamaForCausalLM(config)


class BaseWeights:
    """One random base model kept as a state dict (parameters and all buffers); `new()` is a fresh copy."""

    def __init__(self, spec: ModelSpec, device: str, seed: int = 0):
        self.spec, self.device = spec, device
        torch.manual_seed(seed)
        model = build_model(spec, "cpu")  # random init as transformers does it
        self.state = {name: t.detach().to(device) for name, t in
                      [*model.named_parameters(), *model.named_buffers()]}
        self.num_params = sum(p.numel() for p in model.parameters())
        del model

    def new(self) -> nn.Module:
        model = build_model(self.spec, "meta").to_empty(device=self.device)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                t.copy_(self.state[name])
        model.eval()  # no dropout: the same work for every method
        return model


def make_batch(spec: ModelSpec, device: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    return {"input_ids": ids}


def loss_of(model: nn.Module, spec: ModelSpec, batch: dict) -> torch.Tensor:
    if spec.kind == "llama":
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    return model(input_ids=batch["input_ids"]).last_hidden_state.float().pow(2).mean()


def linear_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(out, in) of every targeted linear layer."""
    model = build_model(spec, "meta")
    return [tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in spec.targets]


def rank_for(spec: ModelSpec, k: int) -> tuple[int, int]:
    """The rank r >= 1 whose LoRA/SHiRA count r * sum(m + n) over the targets is nearest k, and that count."""
    per_rank = sum(o + i for o, i in linear_shapes(spec))
    r = max(1, round(k / per_rank))
    return r, r * per_rank


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    key: str  # unique in a run, e.g. "apet-discrete@k=1000"
    family: str  # full, peft-lora, apet-lora, shira, peft-prompt, apet-prompt, apet-adapter, apet-bitfit, ...
    k: int | None = None  # nominal k of the sparse grid (None for the presets)
    r: int | None = None
    mergeable: bool = True
    expected: int | None = None  # trainable count asked for, where it is exact by construction


def methods_for(spec: ModelSpec, run: Run) -> list[Method]:
    total = sum(o * i for o, i in linear_shapes(spec))
    r1 = rank_for(spec, 1)[1]
    if run.what == "memory":
        return [Method(REFERENCE, "peft-lora", r=8), Method("shira@r=1", "shira", k=r1, r=1, expected=r1),
                Method(f"apet-discrete@k={r1}", "apet-discrete", k=r1, expected=r1),
                Method(f"apet-adjacent@k={r1}", "apet-adjacent", k=r1, expected=r1)]
    out = [Method(REFERENCE, "peft-lora", r=8), Method("apet-lora", "apet-lora", r=8),
           Method("apet-adapter", "apet-adapter", mergeable=False), Method("apet-bitfit", "apet-bitfit"),
           Method("apet-prompt", "apet-prompt", mergeable=False), Method("peft-prompt", "peft-prompt", mergeable=False)]
    if run.full_ft:
        out.append(Method("full", "full", mergeable=False))
    ranks: dict[int, int] = {}
    for k in sorted({*run.ks, r1}):
        if k > total:
            continue
        r, _ = rank_for(spec, k)
        if k in run.ks:
            ranks.setdefault(r, k)
        out += [Method(f"apet-discrete@k={k}", "apet-discrete", k=k, expected=k),
                Method(f"apet-adjacent@k={k}", "apet-adjacent", k=k, expected=k)]
    for r in sorted(ranks):
        count = rank_for(spec, ranks[r])[1]
        if r != 8:
            out.append(Method(f"peft-lora@r={r}", "peft-lora", r=r, expected=count))
        out.append(Method(f"shira@r={r}", "shira", r=r, expected=count))
    return out


def attach(method: Method, model: nn.Module, spec: ModelSpec) -> nn.Module:
    task = spec.task_type
    targets = spec.targets
    family = method.family
    if family == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if family == "peft-lora":
        return get_peft_model(model, LoraConfig(r=method.r, lora_alpha=8, target_modules=targets, task_type=task))
    if family == "shira":
        return get_peft_model(model, ShiraConfig(r=method.r, target_modules=targets, random_seed=0, task_type=task))
    if family == "peft-prompt":
        return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=20, task_type=task))
    configs: dict[str, Callable[[], APETConfig]] = {
        "apet-lora": lambda: APETConfig.lora(r=method.r, lora_alpha=8, target_modules=targets, task_type=task),
        "apet-adapter": lambda: APETConfig.adapter(task_type=task),
        "apet-bitfit": lambda: APETConfig.bitfit(task_type=task),
        "apet-prompt": lambda: APETConfig.prompt(num_virtual_tokens=20, task_type=task),
        "apet-discrete": lambda: APETConfig.delta(mask="discrete", num_trainable_params=method.k,
                                                  target_modules=targets, task_type=task),
        "apet-adjacent": lambda: APETConfig.delta(mask="adjacent", num_trainable_params=method.k,
                                                  target_modules=targets, task_type=task),
    }
    return get_peft_model(model, configs[family]())


# ---------------------------------------------------------------------------------------------- memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
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
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Largest RSS seen every `interval` seconds between start() and stop()."""

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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- one method
def trainable_state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    param_b = sum(p.numel() * p.element_size() for p in params)
    grad_b = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt_b = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return {"params": param_b, "grads": grad_b, "optimizer": opt_b, "total": param_b + grad_b + opt_b,
            "param_tensors": len(params)}


def adapter_file(model: nn.Module) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        path = Path(tmp) / "adapter_model.safetensors"
        size = path.stat().st_size
        with path.open("rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
    return {"file_bytes": size, "payload_bytes": size - header}


def time_steps(model: nn.Module, spec: ModelSpec, batch: dict, optimizer, params, n: int, device: str):
    times, state = [], None
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        loss = loss_of(model, spec, batch)
        loss.backward()
        optimizer.step()
        _sync(device)
        state = trainable_state_bytes(params, optimizer)  # outside the timed part
        t_mid = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        times.append((t_mid - t) + (time.perf_counter() - t_mid))
        del loss
    return times, state


@torch.no_grad()
def time_inference(a: nn.Module, b: nn.Module, batch: dict, reps: int, device: str) -> tuple[list, list]:
    """Alternate forward passes of `a` and `b` (after one untimed pass each)."""
    ta, tb = [], []
    for model in (a, b):
        model(**batch)
    for _ in range(reps):
        for model, times in ((a, ta), (b, tb)):
            _sync(device)
            t = time.perf_counter()
            model(**batch)
            _sync(device)
            times.append(time.perf_counter() - t)
    return ta, tb


def measure(method: Method, base: BaseWeights, run: Run, batch: dict, device: str, log) -> dict:
    spec = base.spec
    model = base.new()
    trim_memory()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        alloc0, reserved0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    rss0 = current_rss()
    with PeakSampler() as sampler:
        t = time.perf_counter()
        model = attach(method, model, spec)
        inject_s = time.perf_counter() - t
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train(False)
        warm, state = time_steps(model, spec, batch, optimizer, params, run.warmup, device)
        steps, state = time_steps(model, spec, batch, optimizer, params, run.measured, device)
    record = {
        "model": spec.name, "method": method.key, "family": method.family, "k": method.k, "r": method.r,
        "expected_trainable": method.expected, "trainable": sum(p.numel() for p in params),
        "inject_s": inject_s, "warmup_step_s": warm, "step_s": steps, "state_bytes": state,
        "peak_rss_delta": sampler.peak - rss0, "rss_before": rss0,
    }
    if cuda:
        record["cuda_peak_allocated_delta"] = torch.cuda.max_memory_allocated() - alloc0
        record["cuda_peak_reserved_delta"] = torch.cuda.max_memory_reserved() - reserved0
    del optimizer
    if method.family != "full":
        record.update(adapter_file(model))
    if method.mergeable and run.infer_reps:
        merged = model.merge_and_unload()
        reference = base.new()
        t_merged, t_base = time_inference(merged, reference, batch, run.infer_reps, device)
        record.update(infer_merged_s=t_merged, infer_base_s=t_base)
        del merged, reference
    del model, params
    trim_memory()
    log(f"  {spec.name} {method.key}: step {statistics.median(steps) * 1e3:.0f} ms, "
        f"peak +{record['peak_rss_delta'] / 2**20:.0f} MiB, trainable {record['trainable']}")
    return record


# ---------------------------------------------------------------------------------------------- runs
def full_ft_fits(num_params: int, device: str) -> tuple[bool, str]:
    """Full fine-tuning needs about 16 bytes per parameter (weights, gradients, two AdamW moments) on top of the
    base copy kept for rebuilding, plus activations: run it only where that fits with 25% to spare."""
    need = 20 * num_params + 2**30
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return need * 1.25 < free, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"


def measure_run(run: Run, device: str, log) -> dict:
    spec = MODELS[run.model]
    log(f"{run.what} run on {spec.name} ({run.rounds} round(s) x {run.measured} measured steps)")
    t = time.perf_counter()
    base = BaseWeights(spec, device)
    log(f"  base model: {base.num_params / 1e6:.1f}M parameters, built in {time.perf_counter() - t:.1f} s")
    notes = []
    if run.what == "grid" and run.full_ft:
        fits, why = full_ft_fits(base.num_params, device)
        if not fits:
            run = replace(run, full_ft=False)
            notes.append(f"full fine-tuning skipped: {why}")
            log("  " + notes[-1])
    methods = methods_for(spec, run)
    batch = make_batch(spec, device)
    records = []
    for round_ in range(run.rounds):
        order = methods if round_ % 2 == 0 else methods[::-1]  # interleaved, alternating direction
        for method in order:
            try:
                rec = measure(method, base, run, batch, device, log)
            except Exception as e:  # noqa: BLE001 - a failed method is reported, the others still run
                rec = {"model": spec.name, "method": method.key, "family": method.family, "error": repr(e)}
                log(f"  {spec.name} {method.key}: FAILED {e!r}")
                trim_memory()
            rec["round"] = round_
            records.append(rec)
    del base
    trim_memory()
    return {"model": spec.name, "what": run.what, "spec": spec.__dict__, "run": run.__dict__, "notes": notes,
            "records": records}


def mask_construction(mode: Mode, log) -> dict:
    """Time of `build_mask` over every linear layer of the model at k, and of the whole injection."""
    import peft_apet.masked_weight as mw

    spec = MODELS[mode.mask_model]
    model = build_model(spec, "meta")
    out = {"model": spec.name, "k": mode.mask_k, "layers": len(linear_shapes(spec))}
    original = mw.build_mask
    for mask in ("discrete", "adjacent"):
        spent: list[float] = []

        def timed(*args, spent=spent, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t)

        build_s, inject_s = [], []
        mw.build_mask = timed
        try:
            for _ in range(mode.mask_reps):
                spent.clear()
                fresh = build_model(spec, "meta")
                t = time.perf_counter()
                get_peft_model(fresh, APETConfig.delta(mask=mask, num_trainable_params=mode.mask_k,
                                                       target_modules=spec.targets))
                inject_s.append(time.perf_counter() - t)
                build_s.append(sum(spent))
        finally:
            mw.build_mask = original
        out[mask] = {"build_mask_s": build_s, "inject_s": inject_s}
        log(f"mask construction {mask} k={mode.mask_k} on {spec.name}: build_mask "
            f"{statistics.median(build_s):.3f} s, injection {statistics.median(inject_s):.3f} s")
    del model
    return out


# ---------------------------------------------------------------------------------------------- analysis
def med(values) -> float | None:
    return statistics.median(values) if values else None


def summarise(run: dict) -> list[dict]:
    """One row per method: medians over rounds, ratios to the reference PEFT LoRA and to LoRA/SHiRA at the same k."""
    by: dict[str, list[dict]] = {}
    for r in run["records"]:
        by.setdefault(r["method"], []).append(r)
    rows = []
    for key, recs in by.items():
        ok = [r for r in recs if "error" not in r]
        if not ok:
            rows.append({"model": run["model"], "method": key, "family": recs[0]["family"], "error": recs[0]["error"]})
            continue
        r0 = ok[0]
        steps = [s for r in ok for s in r["step_s"]]
        row = {"model": run["model"], "method": key, "family": r0["family"], "k": r0["k"], "r": r0["r"],
               "trainable": r0["trainable"], "expected_trainable": r0["expected_trainable"],
               "step_ms": med(steps) * 1e3, "steps_measured": len(steps),
               "peak_mib": med([r["peak_rss_delta"] for r in ok]) / 2**20,
               "state_bytes": r0["state_bytes"]["total"], "param_tensors": r0["state_bytes"]["param_tensors"],
               "file_bytes": r0.get("file_bytes"), "payload_bytes": r0.get("payload_bytes"),
               "inject_s": med([r["inject_s"] for r in ok])}
        if "cuda_peak_allocated_delta" in r0:
            row["cuda_alloc_mib"] = med([r["cuda_peak_allocated_delta"] for r in ok]) / 2**20
            row["cuda_reserved_mib"] = med([r["cuda_peak_reserved_delta"] for r in ok]) / 2**20
        row["file_bytes_per_param"] = row["file_bytes"] / row["trainable"] if row["file_bytes"] else None
        row["payload_bytes_per_param"] = row["payload_bytes"] / row["trainable"] if row["payload_bytes"] else None
        row["state_bytes_per_param"] = row["state_bytes"] / row["trainable"]
        merged = [s for r in ok for s in r.get("infer_merged_s", [])]
        based = [s for r in ok for s in r.get("infer_base_s", [])]
        row["merged_infer_ratio"] = med(merged) / med(based) if merged and based else None
        rows.append(row)
    ref = next((r for r in rows if r["method"] == REFERENCE and "error" not in r), None)
    by_key = {r["method"]: r for r in rows}
    for row in rows:
        if "error" in row:
            continue
        if ref:
            row["step_ratio"] = row["step_ms"] / ref["step_ms"]
            row["peak_ratio"] = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else None
            row["state_ratio"] = row["state_bytes"] / ref["state_bytes"]
            row["file_ratio"] = row["file_bytes"] / ref["file_bytes"] if row["file_bytes"] else None
        if row["family"] in ("apet-discrete", "apet-adjacent") and row["k"] is not None:
            spec = ModelSpec(**run["spec"])
            r, _ = rank_for(spec, row["k"])
            lora = by_key.get(REFERENCE if r == 8 else f"peft-lora@r={r}")
            shira = by_key.get(f"shira@r={r}")
            for name, other in (("lora_k", lora), ("shira_k", shira)):
                if other and "error" not in other:
                    row[f"vs_{name}"] = other["method"]
                    row[f"step_vs_{name}"] = row["step_ms"] / other["step_ms"]
                    row[f"peak_vs_{name}"] = row["peak_mib"] / other["peak_mib"] if other["peak_mib"] > 0 else None
            if row["family"] == "apet-adjacent":
                disc = by_key.get(f"apet-discrete@k={row['k']}")
                if disc and "error" not in disc:
                    row["step_vs_discrete"] = row["step_ms"] / disc["step_ms"]
    return rows


def check_targets(runs: list[dict], rows: dict[str, list[dict]], masks: dict) -> list[dict]:
    """Each target of the issue: met or missed, with the measured value."""
    out = []

    def add(target: str, model: str, value: float | None, limit: float, note: str = "", lower: bool = True):
        if value is None:
            return
        met = value <= limit if lower else value >= limit
        out.append({"target": target, "model": model, "value": value, "limit": limit, "met": met, "note": note})

    for run in runs:
        model = run["model"]
        rs = {r["method"]: r for r in rows[f"{run['what']}:{model}"] if "error" not in r}
        ref = rs.get(REFERENCE)
        if ref and "apet-lora" in rs:
            add("APET lora step time / PEFT LoRA <= 1.02", model, rs["apet-lora"]["step_ratio"], 1.02)
            add("APET lora peak memory / PEFT LoRA within 2%", model, abs(rs["apet-lora"]["peak_ratio"] - 1), 0.02,
                note=f"ratio {rs['apet-lora']['peak_ratio']:.3f}")
        for r in rs.values():
            if r["family"] == "apet-discrete":
                for name in ("lora_k", "shira_k"):
                    if r.get(f"step_vs_{name}") is not None:
                        add(f"APET discrete step time / {r[f'vs_{name}']} <= 1.0", f"{model} k={r['k']}",
                            r[f"step_vs_{name}"], 1.0)
                if r.get("peak_vs_shira_k") is not None:
                    add("APET discrete peak memory < SHiRA", f"{model} k={r['k']}", r["peak_vs_shira_k"], 1.0,
                        note=f"vs {r['vs_shira_k']} ({rs[r['vs_shira_k']]['trainable']} entries)")
                excess = r["state_bytes"] - 16 * r["trainable"]
                add("APET discrete trainable state = 16 B x k (+4 B AdamW step counter per tensor)",
                    f"{model} k={r['k']}", abs(excess - 4 * r["param_tensors"]), 0,
                    note=f"{r['state_bytes']} B for k={r['trainable']}, {r['param_tensors']} tensors")
            if r["family"] == "apet-adjacent" and r.get("step_vs_discrete") is not None:
                add("APET adjacent step time / discrete <= 1.0", f"{model} k={r['k']}", r["step_vs_discrete"], 1.0)
            if r["family"] in ("apet-adjacent", "apet-discrete") and r.get("file_bytes_per_param"):
                limit = 4.1 if r["family"] == "apet-adjacent" else 6.0
                add(f"{r['family']} adapter file <= {limit} B/param", f"{model} k={r['k']}",
                    r["file_bytes_per_param"], limit, note=f"payload alone {r['payload_bytes_per_param']:.2f} B/param")
            if r.get("merged_infer_ratio") is not None:
                add("merged inference / base <= 1.01", f"{model} {r['method']}", r["merged_infer_ratio"], 1.01)
    for mask in ("discrete", "adjacent"):
        if mask in masks:
            add(f"mask construction ({mask}), every linear layer, k={masks['k']} <= 2 s", masks["model"],
                med(masks[mask]["build_mask_s"]), 2.0, note=f"whole injection {med(masks[mask]['inject_s']):.2f} s")
    return out


# ---------------------------------------------------------------------------------------------- report
def machine() -> dict:
    import peft
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "peft_apet": peft_apet.__version__,
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.release()}",
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _f(value, fmt: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def markdown(meta: dict, runs: list[dict], rows: dict[str, list[dict]], masks: dict, targets: list[dict]) -> str:
    m = meta["machine"]
    lines = ["# Cost of APET against full fine-tuning, PEFT LoRA, SHiRA and prompt tuning", "",
             f"- date: {meta['date']}",
             f"- machine: {m['cpu']}, {m['cores']} usable cores, torch threads {m['torch_threads']}, "
             f"{m['platform']}, load average at start {_f(m['load_average'])}",
             f"- versions: torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"peft-apet {m['peft_apet']}, Python {m['python']}",
             f"- device: {meta['device']}" + (f" ({m['cuda']})" if m["cuda"] else ""),
             f"- command: `{meta['command']}`", f"- wall time: {meta['wall_s'] / 60:.1f} min", "",
             "Ratios are to PEFT LoRA (r=8, lora_alpha=8, every linear layer of attention and MLP) measured in the "
             "same run on the same model, batch and sequence length. Step = forward + backward + AdamW step + "
             "zero_grad, median over all measured steps of all rounds (methods interleaved, one warm-up step per "
             "round). Peak memory is the peak RSS during injection and steps above the RSS just before injection "
             "(CPU; it includes activations). Trainable state = parameters + gradients + AdamW state. "
             "`file B/p` = adapter_model.safetensors bytes per trainable parameter (`payload` leaves out the "
             "safetensors JSON header). Merged = inference time after merge_and_unload over a fresh base model's, "
             "alternated. `vs LoRA@k` / `vs SHiRA@k`: step-time ratio to PEFT LoRA / SHiRA at the rank whose count "
             "is nearest k (`r`, count in their rows).", ""]
    for run in runs:
        spec = run["spec"]
        key = f"{run['what']}:{run['model']}"
        params = sum(o * i for o, i in linear_shapes(ModelSpec(**spec)))
        title = "grid" if run["what"] == "grid" else "memory check: SHiRA vs APET at equal k, all linear layers"
        lines += [f"## {run['model']} — {title}", "",
                  f"{spec['kind']}: hidden {spec['hidden']}, {spec['layers']} layers, intermediate "
                  f"{spec['intermediate']}, vocab {spec['vocab']}; batch {spec['batch']} x sequence {spec['seq']}; "
                  f"targeted linear weights: {params / 1e6:.1f}M entries. Rounds {run['run']['rounds']}, "
                  f"measured steps per round {run['run']['measured']}.", ""]
        lines += [f"- {n}" for n in run["notes"]]
        lines += ["| method | r | trainable | step ms | step ratio | vs LoRA@k | vs SHiRA@k | peak MiB | peak ratio "
                  "| state bytes | state B/p | file bytes | file B/p | payload B/p | merged/base |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows[key]:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error'][:80]} |" + " |" * 13)
                continue
            lines.append(
                f"| {r['method']} | {_f(r['r'])} | {r['trainable']:,} | {r['step_ms']:.0f} | {_f(r.get('step_ratio'))} "
                f"| {_f(r.get('step_vs_lora_k'))} | {_f(r.get('step_vs_shira_k'))} | {r['peak_mib']:.0f} "
                f"| {_f(r.get('peak_ratio'))} | {r['state_bytes']:,} | {r['state_bytes_per_param']:.2f} "
                f"| {_f(r['file_bytes'])} | {_f(r['file_bytes_per_param'])} | {_f(r['payload_bytes_per_param'])} "
                f"| {_f(r['merged_infer_ratio'], '.3f')} |")
        lines.append("")
    if masks:
        lines += [f"## Mask construction ({masks['model']}, {masks['layers']} linear layers, k = {masks['k']:,})", "",
                  "| mask | build_mask s (median) | whole get_peft_model s (median) |", "|---|---|---|"]
        for mask in ("discrete", "adjacent"):
            lines.append(f"| {mask} | {med(masks[mask]['build_mask_s']):.3f} | {med(masks[mask]['inject_s']):.3f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | where | measured | limit | met | note |", "|---|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['model']} | {t['value']:.3f} | {t['limit']} | "
                     f"{'met' if t['met'] else '**missed**'} | {t['note']} |")
    missed = [t for t in targets if not t["met"]]
    lines += ["", f"{len(targets) - len(missed)} of {len(targets)} target checks met."]
    if meta.get("discussion"):
        lines += ["", "## Discussion", "", meta["discussion"]]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, list[dict]], path: Path, stamp: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    grids = [(k, v) for k, v in rows.items() if k.startswith("grid:")]
    if not grids:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 4), squeeze=False)
    for ax, (key, rs) in zip(axes[0], grids):
        ok = [r for r in rs if "error" not in r]
        for family, style in (("apet-discrete", "o-"), ("apet-adjacent", "s-")):
            pts = sorted((r["trainable"], r["step_ratio"]) for r in ok if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), style, label=family)
        for family, style in (("peft-lora", "^"), ("shira", "v")):
            pts = sorted((r["trainable"], r["step_ratio"]) for r in ok if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), style, label=family, markersize=8)
        for r in ok:
            if r["family"] in ("apet-lora", "apet-adapter", "apet-bitfit", "apet-prompt", "peft-prompt", "full"):
                ax.plot(r["trainable"], r["step_ratio"], "x", color="grey")
                ax.annotate(r["family"], (r["trainable"], r["step_ratio"]), fontsize=6)
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("step time / PEFT LoRA r=8")
        ax.set_title(key.split(":", 1)[1])
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.text(0.01, 0.01, stamp, fontsize=5, color="dimgrey")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CSV_COLUMNS = ["model", "method", "family", "k", "r", "trainable", "expected_trainable", "step_ms", "step_ratio",
               "step_vs_lora_k", "step_vs_shira_k", "step_vs_discrete", "peak_mib", "peak_ratio", "state_bytes",
               "state_bytes_per_param", "file_bytes", "file_bytes_per_param", "payload_bytes_per_param",
               "merged_infer_ratio", "inject_s", "steps_measured", "error"]


def write_outputs(out: Path, meta: dict, runs: list[dict], masks: dict) -> dict:
    rows = {f"{run['what']}:{run['model']}": summarise(run) for run in runs}
    targets = check_targets(runs, rows, masks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "mask_construction": masks,
                                                  "summary": rows, "targets": targets}, indent=1, default=str))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rs in rows.values():
            writer.writerows(rs)
    (out / "results.md").write_text(markdown(meta, runs, rows, masks, targets))
    stamp = f"{meta['date']} · {meta['machine']['cores']} CPU cores · torch {torch.__version__} · {meta['command']}"
    plot(rows, out / "step_ratio_vs_k.png", stamp)
    return {"rows": rows, "targets": targets}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="every k on BERT-base and the 1B Llama, more repeats")
    size.add_argument("--smoke", action="store_true", help="tiny models, two budgets, two steps (the test)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md/csv/png from results.json (e.g. after editing discussion.md)")
    parser.add_argument("--only", default=None, help="comma-separated model names: run only these (debugging)")
    args = parser.parse_args(argv)
    mode = MODES["full" if args.full else "smoke" if args.smoke else "default"]
    if args.only:
        keep = set(args.only.split(","))
        mode = replace(mode, runs=tuple(r for r in mode.runs if r.model in keep))
    out = args.out or (DEFAULT_OUT if mode.name == "default" else DEFAULT_OUT.parent / f"cost_{mode.name}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/cost.py", *(argv if argv is not None else sys.argv[1:])])
    log_file = (out / "run.log").open("a" if args.report_only else "w")

    def log(message: str) -> None:
        line = f"[{datetime.datetime.now():%H:%M:%S}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        meta = saved["meta"]
        if (out / "discussion.md").exists():
            meta["discussion"] = (out / "discussion.md").read_text().strip()
        write_outputs(out, meta, saved["runs"], saved["mask_construction"])
        return 0
    start = time.perf_counter()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "command": command,
            "mode": mode.name, "device": args.device}
    log(f"start {command}")
    masks = mask_construction(mode, log)
    runs = [measure_run(run, args.device, log) for run in mode.runs]
    meta["wall_s"] = time.perf_counter() - start
    discussion = out / "discussion.md"  # hand-written notes on missed targets, kept across reruns
    if discussion.exists():
        meta["discussion"] = discussion.read_text().strip()
    write_outputs(out, meta, runs, masks)
    log(f"report written to {out} in {meta['wall_s'] / 60:.1f} min")
    log_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
