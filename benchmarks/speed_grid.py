"""Step time and peak memory of APET's sparse deltas against PEFT LoRA, SHiRA, SpaRTA, full fine-tuning and a floor,
at the batch sizes people train with (issue 14).

    python -m benchmarks.speed_grid --threads 2              # default grid (resumes; see benchmarks/README.md)
    python -m benchmarks.speed_grid --smoke --out /tmp/x     # tiny models, two grid points (the test)
    python -m benchmarks.speed_grid --device cuda --bf16     # the same on a GPU, under bf16 autocast
    python -m benchmarks.speed_grid --report-only            # rebuild results.md from results.json

A grid point is (model, tokens per step, targets, density per layer). At each point every method is built on a
fresh copy of the same base weights, the methods are interleaved in rounds (alternating direction), and a method's
step time (forward + backward + AdamW step + zero_grad) is the median of its measured steps over all rounds. The
methods train the same k per layer: APET discrete and adjacent deltas exactly `round(density * out * in)` (at
least 1), PEFT LoRA and SHiRA the rank `r = round(k / (in + out)) >= 1` of each layer (so at low density they
train more: their exact counts are reported), SpaRTA (`peft-sparta`, when installed) a Bernoulli sample of the
same density of each targeted weight, and the floor one trainable bias in the first layer (the backward pass still
runs through every layer). The floor and full fine-tuning (where it fits) run once per (model, tokens), at its
reference point; every point's overheads are taken over that floor. LoRA and SHiRA at a point whose per-layer ranks
equal those of an earlier point of the same (model, tokens, targets) are the same model doing the same work (at
densities 1e-4 and 1e-3 every rank rounds up to 1): their record is reused, marked `shared_from`, not measured again.
Each (model, tokens) group runs in a child process of its own, after one untimed floor step (`warm_up`).

Peak memory: on CPU the largest RSS seen by the harness's sampler during injection and all steps, less the RSS
before injection, with glibc's mmap threshold fixed at 1 MiB from the start of the run (`harness.fix_mmap_threshold`;
recorded per point: points run before it existed have `mmap_threshold` absent), so that RSS follows live memory
rather than where glibc kept earlier methods' frees; on CUDA `max_memory_allocated` (after
`reset_peak_memory_stats`) less the allocation before. Also per method, allocator-independent: the bytes of the
distinct non-parameter storages autograd saved for backward in the first step (`saved_for_backward`).
Results are written as each point finishes, and a rerun skips the points already in `results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, ShiraConfig, get_peft_model
from torch import nn

import peft_apet.functional as apet_functional
import peft_apet.routes as apet_routes
from benchmarks import harness
from benchmarks.harness import PeakSampler, SavedForBackward, current_rss, trim_memory
from benchmarks.speed_grid_report import write_report
from peft_apet import APETConfig


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "bert" (BertModel, loss: mean square of the last hidden state) or "llama" (causal LM loss)
    config: dict  # keyword arguments of BertConfig / LlamaConfig (dropout 0: every method does the same work)
    floor_bias: str  # the one trainable parameter of the floor
    targets: dict[str, tuple[str, ...]]


BERT_TARGETS = {"qv": ("query", "value"), "all-linear": ("query", "key", "value", "dense")}
LLAMA_TARGETS = {"qv": ("q_proj", "v_proj"),
                 "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Qwen2-0.5B's shape as a Llama config: 24 layers, hidden 896, 14 query / 2 key-value heads, biased attention
# projections (Llama's flag also biases o_proj), tied 151,936-token embeddings: 494M parameters.
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "attention_bias": True,
             "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096}
MODELS = {
    "bert-base": ModelSpec("bert-base", "bert", NO_DROPOUT, "encoder.layer.0.attention.self.query.bias",
                           BERT_TARGETS),
    "llama-0.5b": ModelSpec("llama-0.5b", "llama", QWEN2_05B, "model.layers.0.self_attn.q_proj.bias", LLAMA_TARGETS),
    "tiny-bert": ModelSpec("tiny-bert", "bert", {**NO_DROPOUT, "hidden_size": 32, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "intermediate_size": 64,
                                                 "vocab_size": 100}, "encoder.layer.0.attention.self.query.bias",
                           BERT_TARGETS),
    "tiny-llama": ModelSpec("tiny-llama", "llama", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "num_key_value_heads": 1,
                                                    "vocab_size": 100, "attention_bias": True,
                                                    "tie_word_embeddings": True},
                            "model.layers.0.self_attn.q_proj.bias", LLAMA_TARGETS),
}
TOKENS = {512: (8, 64), 2048: (16, 128), 8192: (32, 256)}  # tokens per step: (batch, sequence length)
DENSITIES = (1e-4, 1e-3, 1 / 64, 1 / 8)


@dataclass(frozen=True)
class Point:
    """One grid point; `targets` None is the reference point of (model, tokens): floor and full fine-tuning."""

    model: str
    batch: int
    seq: int
    targets: str | None = None
    density: float | None = None

    @property
    def key(self) -> str:
        what = "reference" if self.targets is None else f"{self.targets}/d={self.density:.6g}"
        return f"{self.model}/{self.batch}x{self.seq}/{what}"


@dataclass(frozen=True)
class Mode:
    name: str
    points: tuple[Point, ...]
    rounds: int
    warmup: int  # per round
    measured: int  # per round


def grid(models_tokens: list[tuple[str, int]], densities=DENSITIES, targets=("qv", "all-linear")) -> tuple:
    """Every point of the given (model, tokens) pairs, each pair's reference point first."""
    points = []
    for model, tokens in models_tokens:
        batch, seq = TOKENS[tokens]
        points.append(Point(model, batch, seq))
        points += [Point(model, batch, seq, t, d) for d in densities for t in targets]
    return tuple(points)


# Cheapest first, so that a run stopped early has the small shapes complete.
DEFAULT_ORDER = [("bert-base", 512), ("bert-base", 2048), ("llama-0.5b", 512), ("bert-base", 8192),
                 ("llama-0.5b", 2048)]
MODES = {
    "smoke": Mode("smoke", (Point("tiny-bert", 2, 8), Point("tiny-bert", 2, 8, "all-linear", 1 / 8),
                            Point("tiny-llama", 2, 8), Point("tiny-llama", 2, 8, "qv", 1 / 64),
                            Point("tiny-llama", 2, 8, "qv", 1e-3)),  # the last: the same ranks as 1/64
                 rounds=1, warmup=1, measured=1),
    # One measured step per method, no warm-up: with 2 threads BERT-base steps take up to ~25 s and the 0.5B
    # Llama's up to ~50 s, and this grid takes about an hour (benchmarks/results/speed_grid/discussion.md).
    "default": Mode("default", grid(DEFAULT_ORDER), rounds=1, warmup=0, measured=1),
    "reduced": Mode("reduced", grid([("bert-base", 2048), ("llama-0.5b", 2048)], densities=(1e-3, 1 / 8)),
                    rounds=2, warmup=1, measured=2),  # gpu_check.sh
}


# ---------------------------------------------------------------------------------------------- models
def build_model(spec: ModelSpec, device: str = "meta") -> nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        if spec.kind == "bert":
            return BertModel(BertConfig(**spec.config), add_pooling_layer=False)
        return LlamaForCausalLM(LlamaConfig(**spec.config))


class BaseWeights:
    """One random base model kept as a state dict; `new()` is a fresh copy on `device`."""

    def __init__(self, spec: ModelSpec, device: str, seed: int = 0):
        self.spec, self.device = spec, device
        torch.manual_seed(seed)
        model = build_model(spec, "cpu")
        self.state = {n: t.detach().to(device) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.num_params = sum(p.numel() for p in model.parameters())

    def new(self) -> nn.Module:
        model = build_model(self.spec, "meta").to_empty(device=self.device)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in self.state:  # not a tied copy (the LM head of tied embeddings), tied again below
                    t.copy_(self.state[name])
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        for p in model.parameters():
            p.requires_grad_(False)
        return model.train()  # dropout is 0 in every config: train mode changes no work


def target_layers(spec: ModelSpec, targets: str) -> dict[str, tuple[int, int]]:
    """`{module name: (out, in)}` of the targeted linear layers."""
    names = spec.targets[targets]
    return {name: tuple(m.weight.shape) for name, m in build_model(spec, "meta").named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in names}


# ---------------------------------------------------------------------------------------------- methods
def per_layer_plan(layers: dict[str, tuple[int, int]], density: float) -> dict[str, dict]:
    """Per layer: APET's k (`round(density * out * in)`, >= 1) and LoRA/SHiRA's rank (`round(k / (in + out))`, >= 1)."""
    plan = {}
    for name, (o, i) in layers.items():
        k = min(o * i, max(1, round(density * o * i)))
        plan[name] = {"k": k, "r": max(1, round(k / (o + i))), "shape": (o, i)}
    return plan


def methods_of(point: Point, sparta: bool) -> list[str]:
    if point.targets is None:
        return ["floor", "full"]
    out = ["peft-lora", "shira", "apet-discrete", "apet-adjacent"]
    return out + ["sparta"] if sparta else out


def _rank_groups(plan: dict[str, dict]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in plan.items():
        groups.setdefault(p["r"], []).append(name)
    return groups


def attach(method: str, model: nn.Module, spec: ModelSpec, plan: dict[str, dict]) -> nn.Module:
    """`model` with `method` injected (or its parameters unfrozen) at the plan's per-layer counts."""
    task = "FEATURE_EXTRACTION" if spec.kind == "bert" else "CAUSAL_LM"
    names = list(plan)
    if method == "full":
        return model.requires_grad_(True)
    if method == "floor":
        model.get_parameter(spec.floor_bias).requires_grad_(True)
        return model
    if method in ("apet-discrete", "apet-adjacent"):  # budgets split in proportion to out * in: the plan's k
        k = sum(p["k"] for p in plan.values())
        return get_peft_model(model, APETConfig.delta(mask=method.split("-")[1], num_trainable_params=k,
                                                      target_modules=names, task_type=task))
    groups = _rank_groups(plan)
    if method == "peft-lora":
        first = next(iter(groups))
        pattern = {re.escape(n): r for r, ns in groups.items() if r != first for n in ns}
        return get_peft_model(model, LoraConfig(r=first, lora_alpha=8, target_modules=names, rank_pattern=pattern,
                                                task_type=task))
    if method == "shira":  # SHiRA has one r per adapter: one adapter per rank, all active
        adapters = [f"r{r}" for r in groups]
        for i, (r, ns) in enumerate(groups.items()):
            config = ShiraConfig(r=r, target_modules=ns, random_seed=i, task_type=task)
            if i == 0:
                model = get_peft_model(model, config, adapter_name=adapters[0])
            else:
                model.add_adapter(adapters[i], config)
        model.base_model.set_adapter(adapters)
        return model
    if method == "sparta":
        return sparta_model(model, plan, point_density(plan))
    raise ValueError(f"unknown method {method!r}")


def point_density(plan: dict[str, dict]) -> float:
    return sum(p["k"] for p in plan.values()) / sum(p["shape"][0] * p["shape"][1] for p in plan.values())


def sparta_model(model: nn.Module, plan: dict[str, dict], density: float) -> nn.Module:
    """SpaRTA keeping each targeted weight's entries with probability `density`, every other parameter frozen.

    SpaRTA takes a sparsity over all parameters and freezes parameters by substring; with every non-target
    parameter's full name frozen, keep probability = (1 - sparsity) * total / targeted = density."""
    from peft_sparta import SpaRTA

    weights = {f"{n}.weight" for n in plan}
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    targeted = sum(params[n].numel() for n in weights)
    torch.manual_seed(0)  # SpaRTA samples with the global generator
    wrapped = SpaRTA(model, sparsity=1 - density * targeted / total,
                     frozen_modules=[n for n in params if n not in weights])
    wrapped.model.train()
    return wrapped


# ---------------------------------------------------------------------------------------------- routes
@contextmanager
def route_counter() -> Iterator[dict[str, int]]:
    """Counts of the routes APET's layers take while the block runs: per discrete-delta call, `forward <route>`,
    `grad_x <route>` and `values <route>` as `routes.choose` returns them (counted when the forward runs), and
    `adjacent` per adjacent-delta product."""
    counts: dict[str, int] = {}
    choose, adjacent = apet_routes.choose, apet_functional.adjacent_delta_output

    def tally(route: str) -> None:
        counts[route] = counts.get(route, 0) + 1

    def counted_choose(case):
        chosen = choose(case)
        for what in ("forward", "grad_x", "values"):
            tally(f"{what} {getattr(chosen, what)}")
        return chosen

    def counted_adjacent(*args, **kwargs):
        tally("adjacent")
        return adjacent(*args, **kwargs)

    apet_routes.choose, apet_functional.adjacent_delta_output = counted_choose, counted_adjacent
    try:
        yield counts
    finally:
        apet_routes.choose, apet_functional.adjacent_delta_output = choose, adjacent


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(spec: ModelSpec, point: Point, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, spec.config.get("vocab_size", 30522), (point.batch, point.seq), generator=gen).to(device)


def loss_of(model: nn.Module, spec: ModelSpec, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        if spec.kind == "llama":
            return model(input_ids=ids, labels=ids).loss
        return model(input_ids=ids).last_hidden_state.float().pow(2).mean()


def step_times(model, spec, ids, optimizer, n: int, device: str, bf16: bool) -> list[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        loss_of(model, spec, ids, bf16).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def measure(method: str, base: BaseWeights, point: Point, plan: dict, ids, mode: Mode, args) -> dict:
    spec, device = base.spec, args.device
    model = base.new()
    trim_memory()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    rss0 = current_rss()
    with PeakSampler() as sampler:
        model = attach(method, model, spec, plan)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        # The first step (warm-up or measured) counts routes and saved tensors; both hooks cost microseconds.
        with route_counter() as routes, SavedForBackward(exclude=list(model.parameters())) as saved:
            first = step_times(model, spec, ids, optimizer, 1, device, args.bf16)
        rest = step_times(model, spec, ids, optimizer, mode.warmup + mode.measured - 1, device, args.bf16)
        warm, steps = (first + rest)[:mode.warmup], (first + rest)[mode.warmup:]
    record = {"method": method, "trainable": sum(p.numel() for p in params), "param_tensors": len(params),
              "warmup_step_s": warm, "step_s": steps, "peak_delta": sampler.peak - rss0,
              "saved_for_backward": saved.bytes, "routes": routes}
    if cuda:
        record["cuda_peak_delta"] = torch.cuda.max_memory_allocated() - alloc0
    del model, params, optimizer
    trim_memory()
    return record


RANK_METHODS = ("peft-lora", "shira")  # their work depends on the per-layer ranks only


def ranks_of(plan: dict[str, dict]) -> dict[str, int]:
    return {name: p["r"] for name, p in plan.items()}


def shared_record(method: str, point: Point, plan: dict, done: dict[str, dict]) -> dict | None:
    """A copy of `method`'s record at an earlier point of `done` (stored runs) with the same model, tokens, targets
    and per-layer ranks, marked `shared_from`; None when `method` is not LoRA/SHiRA or no such point ran."""
    if method not in RANK_METHODS:
        return None
    ranks = ranks_of(plan)
    for key, run in done.items():
        p = run["point"]
        if ((p["model"], p["batch"], p["seq"], p["targets"]) != (point.model, point.batch, point.seq, point.targets)
                or ranks_of(run["layers"]) != ranks):
            continue
        for rec in run["records"]:
            if rec["method"] == method and "error" not in rec and "shared_from" not in rec:
                return {**rec, "shared_from": key}
    return None


def run_point(point: Point, base: BaseWeights, mode: Mode, args, log, done: dict[str, dict] | None = None) -> dict:
    """Every method of `point`, in interleaved rounds; LoRA/SHiRA records reused from `done` where they would repeat
    an earlier point's work (see `shared_record`)."""
    spec = base.spec
    sparta = _has_sparta()
    methods = methods_of(point, sparta)
    notes = [] if sparta or point.targets is None else ["SpaRTA not run: peft-sparta is not installed"]
    plan = per_layer_plan(target_layers(spec, point.targets or "qv"), point.density or 1.0)
    ids = make_batch(spec, point, args.device)
    records = []
    for method in [m for m in methods if point.targets is not None]:
        rec = shared_record(method, point, plan, done or {})
        if rec is not None:
            log(f"  {point.key} {method}: same ranks as {rec['shared_from']}, its record reused")
            records.append(rec)
            methods.remove(method)
    for round_ in range(mode.rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            if method == "full":
                floor = next((r for r in records if r["method"] == "floor" and "error" not in r), None)
                fits, why = harness.full_ft_fits(base.num_params, args.device, floor and floor["peak_delta"])
                if not fits:
                    notes.append(f"full fine-tuning not run in round {round_}: {why}")
                    continue
            try:
                rec = measure(method, base, point, plan, ids, mode, args)
                log(f"  {point.key} {method}: step {statistics.median(rec['step_s']) * 1e3:.0f} ms, "
                    f"peak +{rec['peak_delta'] / 2**20:.0f} MiB, trainable {rec['trainable']:,}")
            except Exception as e:  # noqa: BLE001 - a failed method is reported, the others still run
                rec = {"method": method, "error": repr(e)}
                log(f"  {point.key} {method}: FAILED {e!r}")
                trim_memory()
            rec["round"] = round_
            records.append(rec)
    order = methods_of(point, sparta)
    records.sort(key=lambda r: order.index(r["method"]))  # stable: rounds keep their order
    layers = {name: {"shape": p["shape"], "k": p["k"], "r": p["r"]} for name, p in plan.items()}
    return {"point": point.__dict__, "key": point.key, "notes": notes, "records": records,
            "repeats": {"rounds": mode.rounds, "warmup": mode.warmup, "measured": mode.measured},
            "layers": layers if point.targets else {}}


def _has_sparta() -> bool:
    try:
        import peft_sparta  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "speed_grid", smoke="tiny models, three points, one step (the test)",
                               report_only="rebuild results.md from results.json (e.g. after a stopped run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
    parser.add_argument("--reduced", action="store_true", help="the reduced grid of gpu_check.sh")
    parser.add_argument("--only", default=None, help="comma-separated point-key prefixes to run (e.g. bert-base/8x64)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every point in this process (default: one child process per model and token count)")
    parser.add_argument("--parent-command", default=None, help=argparse.SUPPRESS)
    for name in ("rounds", "warmup", "measured"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the mode's {name} steps per round"
                            if name != "rounds" else "override the mode's rounds")
    args = parser.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "reduced" if args.reduced else "default"]
    mode = replace(mode, **{n: getattr(args, n) for n in ("rounds", "warmup", "measured")
                            if getattr(args, n) is not None})
    suffix = "" if mode.name == "default" else f"_{mode.name}"
    out = args.out or harness.results_folder("speed_grid" + (f"_{args.device}" if args.device != "cpu" else ""),
                                             mode.name if suffix else "default")
    command = harness.start("speed_grid", argv, out, args.threads)
    command = args.parent_command or command
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.report_only:
        write_report(out, saved)
        return 0
    log = harness.logger(out / "run.log")
    mmap_threshold = args.device == "cpu" and harness.fix_mmap_threshold()
    saved["meta"] = {"date": harness.now(), "machine": harness.machine(), "command": command, "mode": mode.name,
                     "device": args.device, "bf16": args.bf16, "rounds": mode.rounds, "warmup": mode.warmup,
                     "measured": mode.measured}
    points = [p for p in mode.points if not args.only or any(p.key.startswith(o) for o in args.only.split(","))]
    groups = list(dict.fromkeys(_group(p) for p in points if p.key not in saved["runs"]))
    if len(groups) > 1 and not args.in_process:
        return run_in_children(groups, points, out, args, command, log)
    log(f"start {command}" + (" (child process)" if args.parent_command else ""))
    bases: dict[str, BaseWeights] = {}
    warm: set[str] = set()
    for point in points:
        if point.key in saved["runs"]:
            log(f"{point.key}: done before, skipped")
            continue
        if point.model not in bases:
            bases.clear()
            trim_memory()
            bases[point.model] = BaseWeights(MODELS[point.model], args.device)
        if _group(point) not in warm:
            log(f"{_group(point)}: warm-up floor step {warm_up(point, bases[point.model], args) * 1e3:.0f} ms "
                "(not recorded)")
            warm.add(_group(point))
        t = time.perf_counter()
        saved["runs"][point.key] = run_point(point, bases[point.model], mode, args, log, done=saved["runs"])
        saved["runs"][point.key].update(wall_s=time.perf_counter() - t, date=harness.now(),
                                        load_average=os.getloadavg(), command=command,
                                        mmap_threshold=harness.MMAP_THRESHOLD if mmap_threshold else None)
        harness.write_json(path, saved, end="\n")
        write_report(out, saved)
        log(f"{point.key}: done in {time.perf_counter() - t:.0f} s")
    return 0


def warm_up(point: Point, base: BaseWeights, args) -> float:
    """One untimed floor step at `point`'s model and batch (seconds). The first step at a new shape in a process
    may pay one-time costs (thread pools, the kernels' per-shape set-up), which the floor, measured first, would
    carry. Measured on 2026-11-30 the warm-up step and the floor step after it differed by -4 % to +8 % (ten
    groups): within single-step noise, so this is insurance at about 1 % of the run's time."""
    model = attach("floor", base.new(), base.spec, {})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = step_times(model, base.spec, make_batch(base.spec, point, args.device), optimizer, 1, args.device,
                         args.bf16)[0]
    del model, optimizer
    trim_memory()
    return seconds


def _group(point: Point) -> str:
    return f"{point.model}/{point.batch}x{point.seq}"


def run_in_children(groups: list[str], points: list[Point], out, args, command: str, log) -> int:
    """Each (model, tokens) group's points in a child process of its own, one after the other, then the report.

    One process for the whole grid ran out of memory at the 0.5B Llama's 2,048-token points (24 GiB resident at
    SHiRA's step, against 15 GiB for the same step in a process of its own): what earlier groups left in the heap
    is returned by a process's end, not by `malloc_trim`. A child that fails or is killed is logged; the others
    still run, and the exit status says so."""
    log(f"start {command}: {len(groups)} groups, one child process each")
    flags = [flag for flag, on in (("--smoke", args.smoke), ("--reduced", args.reduced), ("--bf16", args.bf16)) if on]
    flags += [x for n in ("rounds", "warmup", "measured") if getattr(args, n) is not None
              for x in (f"--{n}", str(getattr(args, n)))]
    failed = []
    for group in groups:
        keys = [p.key for p in points if _group(p) == group]
        child = [sys.executable, "-m", "benchmarks.speed_grid", "--in-process", "--out", str(Path(out).resolve()),
                 "--threads", str(args.threads), "--device", args.device, "--only", ",".join(keys),
                 "--parent-command", command, *flags]
        t = time.perf_counter()
        code = subprocess.run(child, cwd=harness.REPO).returncode
        log(f"{group}: child process " + ("done" if code == 0 else f"FAILED (exit status {code}"
                                          + (": killed, e.g. out of memory" if code < 0 else "") + ")")
            + f" in {time.perf_counter() - t:.0f} s")
        if code != 0:
            failed.append(group)
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    saved.setdefault("meta", {})["command"] = command
    write_report(out, saved)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
