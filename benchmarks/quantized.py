"""APET sparse deltas against PEFT QLoRA on a 4-bit base: step time, peak memory, trainable state, RT accuracy.

One command, one process::

    nice -n 10 python -m benchmarks.quantized --threads 1       # SmolLM2-135M in nf4 (real weights), ~17 min
    python -m benchmarks.quantized --smoke --out /tmp/q          # tiny random Llama, synthetic task (the test)

For each budget k (default 1e4, 1e5, 1e6) three methods train on a fresh copy of the same base, loaded with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32)` on CPU:

- `qlora`: PEFT LoRA on every linear projection of the decoder layers (q, k, v, o, gate, up, down). Its count is
  r * sum(m + n); r = 1 already exceeds 1e4 and 1e5 on SmolLM2, so small budgets use r = 1 on the first n layers
  (`layers_to_transform`), n chosen to get nearest k; larger budgets use all layers and the nearest r;
- `apet-discrete` and `apet-adjacent`: an APET delta (the same projections, all layers) with exactly QLoRA's count,
  so k is equal to the parameter. The discrete delta is the side path `base(x) + x W~^T` of `peft_apet.quantized`;
- `apet-discrete-qlora-layers`: the discrete delta with QLoRA's count on QLoRA's layers only, where QLoRA covers
  fewer than all (small k): equal k and equal coverage, so the difference is the method's, not where k is spent.

Measured per method (one command; each method in a fresh Python process, so that none inherits memory another
freed; `--in-process` and `--smoke` run them in this process): the median step time (forward, backward, AdamW
step; after warm-up steps), peak memory as the peak resident set size (RSS, sampled every 5 ms from
/proc/self/statm, `harness.PeakSampler`) during injection and training minus the RSS just before injection
(the quantized base is loaded then). Fresh processes run with glibc's mmap threshold fixed at 1 MiB
(`MALLOC_MMAP_THRESHOLD_`, the same for every method): by default glibc raises it after each large free, after
which bitsandbytes' transient dequantization buffers stay in the heap behind any small long-lived allocation, and
the peak RSS then measured where a method's small arrays happened to land (up to +/-100 MiB here) rather than what
it keeps; the tensor peak of the forward and backward of one more batch after the run (the torch profiler's
memory events: the most tensor bytes alive at once within them, allocator-independent; RSS peaks of one method
varied by up to 44 MiB between rounds); the bytes autograd saves for backward in one forward pass
(allocator-independent: what the side path keeps between forward and backward), the trainable state (parameters
+ gradients + AdamW moments, read from the tensors), and, after the short run, Rotten Tomatoes generation accuracy
on a fixed test prefix (the full-vocabulary argmax at the answer slot must be the label word: the label-word task
of `benchmarks.harness`, as in `paper_findings`).
Ratios are APET / QLoRA at the same k. Nothing is asserted about speed: results.md states what was met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks import harness
from benchmarks.harness import PeakSampler, Task, TensorPeak, current_rss, evaluate, trim_memory, vocab_logits
from peft_apet import APETConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("qlora", "apet-discrete", "apet-adjacent", "apet-discrete-qlora-layers")
SAME_LAYERS = "apet-discrete-qlora-layers"  # runs only where QLoRA covers some layers (else it is apet-discrete)
LR = {"qlora": 3e-4, "apet-discrete": 3e-3, "apet-adjacent": 3e-3,  # paper_findings' picked lr for masked deltas
      SAME_LAYERS: 3e-3}


@dataclass(frozen=True)
class Settings:
    name: str
    budgets: tuple[int, ...]
    batch_size: int
    max_len: int  # review tokens (before the template)
    warmup: int
    steps: int  # measured (and trained) steps after warm-up
    test_size: int
    rounds: int = 1  # every method at every k once per round, the order reversed in odd rounds


SETTINGS = {
    # batch 8 of up to 64 review tokens plus the template: about 400 padded tokens per step on Rotten Tomatoes'
    # short sentences (recorded per step), where 0.1's 4 x 16 measured per-call overheads more than the work; a
    # step of the 4-bit 135M model takes about 3 s on one of these CPU cores, so 4 measured steps and 3 rounds
    # (peaks of one method varied by up to 44 MiB between rounds) keep the run near 25 minutes
    "default": Settings("default", (10_000, 100_000, 1_000_000), batch_size=8, max_len=64, warmup=1, steps=4,
                        test_size=64, rounds=3),
    "smoke": Settings("smoke", (200, 2_000), batch_size=4, max_len=8, warmup=1, steps=2, test_size=16),
}


# ---------------------------------------------------------------------------------------------- model and task
def quantization_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_base(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(),
                                                    device_map="cpu", dtype=torch.float32)


def smoke_task(folder: Path) -> Task:
    """A tiny random Llama (hidden 64) saved to `folder`, and a synthetic two-class task: the label word is token 5
    or 6, and the sequence contains token 7 exactly when the label is 1 (learnable, no download needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=96, pad_token_id=0)).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)

    def examples(n: int) -> list[tuple[list[int], int]]:
        out = []
        for i in range(n):
            ids = torch.randint(8, 96, (10,), generator=g).tolist()
            if i % 2:
                ids[int(torch.randint(0, 10, (1,), generator=g))] = 7
            out.append((ids, i % 2))
        return out

    splits = {"train": examples(64), "test": examples(32)}
    return Task("tiny-llama", "label_words", str(folder), splits, 2, 0, label_token_ids=[5, 6])


def linear_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    """`(layer index, m + n)` of every targeted projection, as `(name, out, in)`."""
    return [(name, m.out_features, m.in_features) for name, m in model.named_modules()
            if name.split(".")[-1] in TARGETS and hasattr(m, "out_features")]


def _layer_index(name: str) -> int:
    """The decoder layer of a projection named `...layers.<i>.<block>.<proj>`."""
    return int(name.split(".layers.")[1].split(".")[0])


def qlora_config(shapes: list[tuple[str, int, int]], k: int) -> tuple[LoraConfig, int, str]:
    """The LoRA config whose count is nearest `k` (see the module docstring), its count, and a description."""
    per_layer: dict[int, int] = {}
    for name, out_f, in_f in shapes:
        layer = _layer_index(name)
        per_layer[layer] = per_layer.get(layer, 0) + out_f + in_f
    layers = sorted(per_layer)
    total = sum(per_layer.values())
    if k >= total:
        r, count = harness.nearest_rank(total, k)
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS), count, f"r={r}, all {len(layers)} layers"
    counts = [sum(per_layer[i] for i in layers[:n]) for n in range(1, len(layers) + 1)]
    n = min(range(len(counts)), key=lambda i: abs(counts[i] - k)) + 1
    config = LoraConfig(r=1, lora_alpha=2, target_modules=TARGETS, layers_to_transform=layers[:n])
    return config, counts[n - 1], f"r=1, first {n} of {len(layers)} layers"


def attach(method: str, model: nn.Module, lora: LoraConfig, count: int) -> nn.Module:
    if method == "qlora":
        return get_peft_model(model, lora)
    targets = TARGETS
    if method == SAME_LAYERS:
        if lora.layers_to_transform is None:
            raise ValueError(f"{SAME_LAYERS} needs a QLoRA config on some layers only (it is apet-discrete here)")
        targets = rf".*\.layers\.({'|'.join(map(str, lora.layers_to_transform))})\.\w+\.({'|'.join(TARGETS)})"
    mask = method.split("-")[1]
    return get_peft_model(model, APETConfig.delta(mask=mask, num_trainable_params=count, target_modules=targets,
                                                  task_type="CAUSAL_LM"))


def methods_at(k: int, shapes: list[tuple[str, int, int]]) -> tuple[str, ...]:
    """The methods run at budget `k`: all, but `SAME_LAYERS` only where QLoRA's config leaves some layers out."""
    layers = qlora_config(shapes, k)[0].layers_to_transform
    partial = layers is not None and len(layers) < len({_layer_index(name) for name, *_ in shapes})
    return tuple(m for m in METHODS if m != SAME_LAYERS or partial)


# ---------------------------------------------------------------------------------------------- one method
def run_method(method: str, k: int, task: Task, settings: Settings, log) -> dict:
    base = load_base(task.path)
    lora, count, description = qlora_config(linear_shapes(base), k)
    trim_memory()
    rss0 = current_rss()
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        model = attach(method, base, lora, count)
        inject_s = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR[method])
        model.train()
        times, losses, tokens = [], [], []
        stream = harness.batches(task.splits["train"], settings.batch_size, seed=0)
        for _ in range(settings.warmup + settings.steps):
            batch = harness.collate(next(stream), task)
            tokens.append(batch["input_ids"].numel())
            t = time.perf_counter()
            # set_to_none=False keeps the gradients allocated: the state is read below
            losses.append(harness.train_step(model, optimizer, batch, task, set_to_none=False))
            times.append(time.perf_counter() - t)
    saved = saved_for_backward_bytes(model, harness.collate(next(stream), task), task)
    # The forward and backward of one more batch under the torch profiler, after the RSS sampler (which would count
    # the profiler's own memory) and before evaluation (an eval-mode pass repacks bitsandbytes' CPU weights): its
    # tensor peak, allocator-independent. No optimizer step, so the evaluated model is the run's.
    profiled = harness.collate(next(stream), task)
    with TensorPeak() as live:
        loss, _ = harness.loss_and_scores(vocab_logits(model, profiled, task, False), profiled["labels"], task)
        loss.backward()
    optimizer.zero_grad(set_to_none=False)
    state = harness.trainable_state_bytes(params, optimizer)
    test = evaluate(model, task.splits["test"], task, False, batch_size=16)
    record = {"method": method, "k": k, "trainable": sum(p.numel() for p in params), "qlora": description,
              "inject_s": inject_s, "step_s": times[settings.warmup:], "warmup_step_s": times[:settings.warmup],
              "losses": losses, "tokens_per_step": tokens[settings.warmup:],
              "peak_rss_delta": sampler.peak - rss0, "rss_before": rss0, "state_bytes": state,
              "tensor_peak_bytes": live.peak,
              "saved_for_backward_bytes": saved,
              "test": test}
    log(f"  k={k} {method}: trainable {record['trainable']}, step {statistics.median(record['step_s']) * 1e3:.0f} ms, "
        f"peak +{record['peak_rss_delta'] / 2**20:.1f} MiB, state {state['total'] / 2**20:.2f} MiB, "
        f"gen acc {test.get('generation_accuracy', float('nan')):.3f}")
    del model, base, optimizer, params
    trim_memory()
    return record


def saved_for_backward_bytes(model: nn.Module, batch: dict, task: Task) -> int:
    """Bytes of the distinct storages autograd keeps from one forward pass for the backward pass: the memory held
    between forward and backward, independent of the allocator (RSS also counts what glibc keeps after a free)."""
    with harness.SavedForBackward() as saved:
        logits = vocab_logits(model, batch, task, False)
    del logits
    return saved.bytes


def run_isolated(method: str, k: int, settings: Settings, smoke: bool, log) -> dict:
    """`run_method` in a fresh Python process (`harness.run_fresh`)."""
    args = ["--one", method, str(k), "--threads", str(torch.get_num_threads()), "--settings",
            json.dumps(asdict(settings))]
    record = harness.run_fresh("quantized", args + (["--smoke"] if smoke else []))
    log(f"  k={k} {method}: trainable {record['trainable']}, step {statistics.median(record['step_s']) * 1e3:.0f} "
        f"ms, peak +{record['peak_rss_delta'] / 2**20:.1f} MiB, saved for backward "
        f"{record['saved_for_backward_bytes'] / 2**20:.1f} MiB, gen acc "
        f"{record['test'].get('generation_accuracy', float('nan')):.3f}")
    return record


def zero_shot(task: Task) -> tuple[dict, list[tuple[str, int, int]]]:
    """The base model's test results and its targeted projections' shapes."""
    model = load_base(task.path)
    out = evaluate(model, task.splits["test"], task, False, batch_size=16)
    shapes = linear_shapes(model)
    del model
    trim_memory()
    return out, shapes


# ---------------------------------------------------------------------------------------------- report
def _merged(records: list[dict]) -> dict:
    """One method at one k over its rounds: all measured steps, mean peak, mean accuracy, first/last loss of each."""
    first = records[0]
    return {**first, "step_s": [t for r in records for t in r["step_s"]],
            "peak_rss_delta": statistics.mean(r["peak_rss_delta"] for r in records),
            "tensor_peak_bytes": _mean_or_none([r.get("tensor_peak_bytes") for r in records]),
            "accuracy": statistics.mean(r["test"]["accuracy"] for r in records),
            "generation_accuracy": statistics.mean(r["test"].get("generation_accuracy", 0.0) for r in records),
            "rounds": len(records)}


def _mean_or_none(values: list) -> float | None:
    """The mean, or None if any value is missing (records of runs before the tensor peak was measured)."""
    return None if not values or None in values else statistics.mean(values)


def summarise(records: list[dict]) -> list[dict]:
    """A row per (k, method) over its rounds: median step over all measured steps, mean peak RSS, ratios to QLoRA."""
    rows = []
    ok = [r for r in records if "error" not in r]
    merged = {(k, m): _merged([r for r in ok if r["k"] == k and r["method"] == m])
              for k, m in dict.fromkeys((r["k"], r["method"]) for r in ok)}
    for k in sorted({r["k"] for r in records}):
        for r in (r for r in records if r["k"] == k and "error" in r):
            rows.append({"k": k, "method": r["method"], "error": r["error"]})
        ref = merged.get((k, "qlora"))
        for method in METHODS:
            r = merged.get((k, method))
            if r is None:
                continue
            step, peak, state = statistics.median(r["step_s"]), r["peak_rss_delta"], r["state_bytes"]["total"]
            saved, tensor_peak = r["saved_for_backward_bytes"], r["tensor_peak_bytes"]
            row = {"k": k, "method": method, "trainable": r["trainable"], "qlora": r["qlora"], "rounds": r["rounds"],
                   "step_ms": step * 1e3, "peak_mib": peak / 2**20, "state_mib": state / 2**20,
                   "saved_mib": saved / 2**20, "generation_accuracy": r["generation_accuracy"],
                   "tensor_peak_mib": None if tensor_peak is None else tensor_peak / 2**20,
                   "accuracy": r["accuracy"], "first_loss": r["losses"][0], "last_loss": r["losses"][-1]}
            if ref is not None:
                row.update(step_ratio=step / statistics.median(ref["step_s"]),
                           peak_ratio=peak / max(ref["peak_rss_delta"], 1),
                           state_ratio=state / ref["state_bytes"]["total"],
                           saved_ratio=saved / ref["saved_for_backward_bytes"],
                           tensor_peak_ratio=None if None in (tensor_peak, ref["tensor_peak_bytes"])
                           else tensor_peak / ref["tensor_peak_bytes"])
            rows.append(row)
    return rows


def _f(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(meta: dict, rows: list[dict], zero: dict) -> str:
    s = meta["settings"]
    lines = [
        "# APET sparse deltas vs PEFT QLoRA on a 4-bit base", "",
        f"Command: `{meta['command']}` · {meta['date']} · {meta['machine']['cores']} CPU cores "
        f"({meta['threads']} torch thread(s)), shared with other jobs · torch {meta['torch']} · "
        f"bitsandbytes {meta['bitsandbytes']} · wall {meta['wall_s'] / 60:.1f} min.", "",
        f"Model: {meta['model']} loaded in 4-bit nf4 (fp32 compute) on CPU. Task: Rotten Tomatoes as next-token "
        f"generation of the label word; batch {s['batch_size']}, at most {s['max_len']} review tokens "
        f"({_f(meta.get('tokens_per_step'), '.0f')} padded tokens per measured step, median), "
        f"{s['warmup']} warm-up + {s['steps']} measured steps per method (the whole short run), AdamW "
        f"(lr {LR['qlora']:g} QLoRA, {LR['apet-discrete']:g} APET). Generation accuracy on the first "
        f"{s['test_size']} test examples; zero-shot: {_f(zero.get('generation_accuracy'), '.3f')} "
        f"(class accuracy {_f(zero.get('accuracy'), '.3f')}).", "",
        f"{s['rounds']} round(s), methods interleaved. Step time: median over the measured steps of all rounds. Peak "
        "memory: mean over rounds of the peak RSS (5 ms sampler) during injection and "
        "training above the RSS before injection" + (", each method in a fresh process with glibc's mmap threshold "
                                                     f"fixed at {meta['mmap_threshold'] / 2**20:g} MiB"
                                                     if meta["isolated"] else "")
        + ". Tensor peak: the most bytes of tensors allocated and not yet freed during the forward and backward "
        "of one more batch after the run (no optimizer step; before evaluation), from the torch profiler's memory "
        "events (allocator-independent; mean over rounds)"
        ". Saved for backward: bytes of the distinct tensors autograd keeps from one forward pass "
        "(allocator-independent). Trainable state: parameters + gradients + AdamW moments. Ratios: APET / QLoRA at "
        "the same k (equal trainable counts).", "",
        "| k | method | trainable | QLoRA config | step ms | step ratio | peak MiB | peak ratio | tensor peak MiB | "
        "tensor peak ratio | saved MiB | saved ratio | state MiB | state ratio | loss first → last | gen. acc | "
        "class acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['k']:,} | {r['method']} | failed: {r['error']} |||||||||||||||")
            continue
        lines.append(
            f"| {r['k']:,} | {r['method']} | {r['trainable']:,} | {r['qlora']} | {r['step_ms']:.0f} | "
            f"{_f(r.get('step_ratio'))} | {r['peak_mib']:.1f} | {_f(r.get('peak_ratio'))} | "
            f"{_f(r.get('tensor_peak_mib'), '.1f')} | {_f(r.get('tensor_peak_ratio'))} | {r['saved_mib']:.1f} | "
            f"{_f(r.get('saved_ratio'))} | {r['state_mib']:.3f} | "
            f"{_f(r.get('state_ratio'))} | {r['first_loss']:.2f} → {r['last_loss']:.2f} | "
            f"{_f(r['generation_accuracy'], '.3f')} | {r['accuracy']:.3f} |")
    lines += ["", "## Target: APET discrete delta at or below QLoRA's peak memory and step time at equal k", ""]
    for r in rows:
        if r["method"] in ("apet-discrete", SAME_LAYERS) and "step_ratio" in r:
            met = r["step_ratio"] <= 1.0 and r["peak_ratio"] <= 1.0
            by_tensors = "" if r.get("tensor_peak_ratio") is None else (
                f"; with the tensor peak ({r['tensor_peak_ratio']:.2f}) for peak memory: "
                + ("met" if r["step_ratio"] <= 1.0 and r["tensor_peak_ratio"] <= 1.0 else "not met"))
            lines.append(f"- k = {r['k']:,}, {r['method']}: step ratio {r['step_ratio']:.2f}, peak-RSS ratio "
                         f"{r['peak_ratio']:.2f} (saved-for-backward ratio {r['saved_ratio']:.2f}): "
                         f"{'met' if met else 'not met'}{by_tensors}.")
    if meta.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in meta["notes"]]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def make_task(settings: Settings, smoke: bool, folder: Path) -> tuple[Task, str]:
    if smoke:
        return smoke_task(folder), "tiny random Llama (hidden 64, 2 layers)"
    task = harness.load_model_task("smollm2", "rotten_tomatoes", max_len=settings.max_len,
                                   test_size=settings.test_size)
    return task, "SmolLM2-135M-Instruct"


def _child(args: argparse.Namespace) -> int:
    settings = Settings(**{**json.loads(args.settings), "budgets": ()})
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        task, _ = make_task(settings, args.smoke, Path(tmp))
        record = run_method(args.one[0], int(args.one[1]), task, settings, lambda message: None)
    args.record.write_text(json.dumps(record))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "quantized", smoke="tiny random Llama and synthetic data (the test)",
                               threads=1)
    parser.add_argument("--budgets", default=None, help="comma-separated k (default 1e4,1e5,1e6)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per method")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (every method at every k once per round)")
    parser.add_argument("--in-process", action="store_true", help="run every method in this process (smoke default)")
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # METHOD K: a child of run_isolated
    parser.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _child(args)
    settings = SETTINGS["smoke" if args.smoke else "default"]
    if args.budgets:
        settings = Settings(**{**asdict(settings), "budgets": tuple(int(float(b)) for b in args.budgets.split(","))})
    if args.steps:
        settings = Settings(**{**asdict(settings), "steps": args.steps})
    if args.rounds:
        settings = Settings(**{**asdict(settings), "rounds": args.rounds})
    out = args.out or harness.results_folder("quantized", settings.name)
    command = harness.start("quantized", argv, out, args.threads)
    log = harness.logger(out / "sweep.log", append=False)
    import bitsandbytes

    start = time.perf_counter()
    log(f"start {command}")
    tmp = tempfile.TemporaryDirectory()
    task, model_name = make_task(settings, args.smoke, Path(tmp.name))
    zero, shapes = zero_shot(task)
    log(f"zero-shot generation accuracy {zero.get('generation_accuracy')}")
    records, plan = [], {k: methods_at(k, shapes) for k in settings.budgets}
    isolated = not (args.in_process or args.smoke)
    for round_ in range(settings.rounds):
        for k in settings.budgets:
            methods = plan[k]
            for method in methods if round_ % 2 == 0 else methods[::-1]:  # interleaved, alternating direction
                try:
                    record = (run_isolated(method, k, settings, args.smoke, log) if isolated
                              else run_method(method, k, task, settings, log))
                except Exception as e:  # noqa: BLE001 - a failed method is reported, the others still run
                    log(f"  k={k} {method}: FAILED {e!r}")
                    record = {"method": method, "k": k, "error": repr(e)}
                    trim_memory()
                records.append({**record, "round": round_})
    tmp.cleanup()
    meta = {"date": harness.now(), "command": command, "machine": harness.machine(),
            "threads": args.threads, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "model": model_name, "settings": asdict(settings), "wall_s": time.perf_counter() - start,
            "isolated": isolated, "methods": {str(k): list(m) for k, m in plan.items()},
            "mmap_threshold": harness.MMAP_THRESHOLD if isolated else None,
            "notes": ["Short runs (a few steps): accuracy differences between methods are not meaningful at this "
                      "length; they show that each method trains on the 4-bit base."]}
    rows = summarise(records)
    steps_tokens = [t for r in records for t in r.get("tokens_per_step", [])]
    meta["tokens_per_step"] = statistics.median(steps_tokens) if steps_tokens else None
    harness.write_json(out / "results.json", {"meta": meta, "zero_shot": zero, "records": records, "summary": rows})
    discussion = out / "discussion.md"  # hand-written notes on the measured numbers, kept across reruns
    (out / "results.md").write_text(markdown(meta, rows, zero)
                                    + ("\n" + discussion.read_text() if discussion.exists() else ""))
    log(f"report written to {out} in {meta['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
