"""Training and inference cost of APET against full fine-tuning, PEFT LoRA, SHiRA and prompt tuning.

One command measures everything in one process and writes the report::

    python -m benchmarks.cost                      # default: BERT-base + Llama-0.5B, 1B memory check (~30 min)
    python -m benchmarks.cost --full               # every k on BERT-base and the 1B Llama, more repeats
    python -m benchmarks.cost --smoke --out /tmp/x # tiny models, two budgets, two steps (the test)
    python -m benchmarks.cost --report-only        # rebuild the report from results.json (+ discussion.md)

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

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, PromptTuningConfig, ShiraConfig, get_peft_model
from torch import nn

from benchmarks import harness
from benchmarks.cost_report import REFERENCE, write_outputs
from benchmarks.harness import PeakSampler, current_rss, trim_memory
from peft_apet import APETConfig


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
    return harness.nearest_rank(sum(o + i for o, i in linear_shapes(spec)), k)


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


# ---------------------------------------------------------------------------------------------- one method
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
        state = harness.trainable_state_bytes(params, optimizer)  # outside the timed part
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
def measure_run(run: Run, device: str, log) -> dict:
    spec = MODELS[run.model]
    log(f"{run.what} run on {spec.name} ({run.rounds} round(s) x {run.measured} measured steps)")
    t = time.perf_counter()
    base = BaseWeights(spec, device)
    log(f"  base model: {base.num_params / 1e6:.1f}M parameters, built in {time.perf_counter() - t:.1f} s")
    notes = []
    if run.what == "grid" and run.full_ft:
        fits, why = harness.full_ft_fits(base.num_params, device)
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


def write_results(out: Path, meta: dict, runs: list[dict], masks: dict) -> dict:
    """The report of `runs` (with `discussion.md`, hand-written notes on missed targets kept across reruns)."""
    discussion = out / "discussion.md"
    if discussion.exists():
        meta["discussion"] = discussion.read_text().strip()
    shapes = {run["model"]: linear_shapes(ModelSpec(**run["spec"])) for run in runs}
    return write_outputs(out, meta, runs, masks, shapes)


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "cost", smoke="tiny models, two budgets, two steps (the test)",
                               full="every k on BERT-base and the 1B Llama, more repeats",
                               report_only="rebuild results.md/csv/png from results.json (e.g. after editing "
                               "discussion.md)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", default=None, help="comma-separated model names: run only these (debugging)")
    args = parser.parse_args(argv)
    mode = MODES["full" if args.full else "smoke" if args.smoke else "default"]
    if args.only:
        keep = set(args.only.split(","))
        mode = replace(mode, runs=tuple(r for r in mode.runs if r.model in keep))
    out = args.out or harness.results_folder("cost", mode.name)
    command = harness.start("cost", argv, out, args.threads)
    log = harness.logger(out / "run.log", append=args.report_only)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        write_results(out, saved["meta"], saved["runs"], saved["mask_construction"])
        return 0
    start = time.perf_counter()
    meta = {"date": harness.now(), "machine": harness.machine(), "command": command, "mode": mode.name,
            "device": args.device}
    log(f"start {command}")
    masks = mask_construction(mode, log)
    runs = [measure_run(run, args.device, log) for run in mode.runs]
    meta["wall_s"] = time.perf_counter() - start
    write_results(out, meta, runs, masks)
    log(f"report written to {out} in {meta['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
