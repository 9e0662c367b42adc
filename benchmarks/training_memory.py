"""Where a training step's memory goes: APET's deltas beside SpaRTA, PEFT LoRA, full fine-tuning and the head alone
on all-MiniLM-L6-v2 + Rotten Tomatoes at 32 x 64 tokens (issue 14: "APET's training peak was 140-210 MB above
SpaRTA's ... find where the memory goes and cut it").

    python -m benchmarks.training_memory --threads 1          # writes benchmarks/results/training_memory/
    python -m benchmarks.training_memory --smoke --out DIR    # tiny random BERT, one budget, in-process (the test)

Methods are `benchmarks.equal_k`'s, as in `benchmarks.moonshot` (all 36 attention and feed-forward linear layers;
APET discrete with random masks, LoRA at the nearest reachable count, SpaRTA at the same density), plus APET
adjacent and `head` (only the classifier trains: what every method pays for activations the head needs). Each
(method, k) runs in a fresh Python process (`harness.run_fresh`: glibc's mmap threshold fixed at 1 MiB), so RSS
follows live memory; it trains `STEPS` steps of one fixed batch (batch 32, texts cut to 64 tokens) with AdamW and
records, in bytes:

- `rss_after_build`: RSS after building the model and applying the method, less the RSS before (tokenizer and
  data loaded); `peak_rss`: the peak RSS during build and training, less the same;
- `peak_tensor_bytes`: in the last step (forward, backward, AdamW step), the largest number of tensor bytes allocated
  in the step and not yet freed (torch profiler memory events): the step's own peak, independent of the allocator;
- `saved_for_backward`: the distinct non-parameter storages autograd saved in the last forward (activations kept);
- `state`: trainable parameters, their gradients and AdamW's moments, read from the tensors;
- `params_and_buffers`: every parameter and buffer the model holds (SpaRTA keeps a frozen copy of each weight it
  trains; APET's values and index buffers are here);
- `index_arrays`: APET's cached index arrays of discrete deltas (CSR, rows/columns), read from its layout cache;
- `rss_after_forward` / `_backward` / `_step`: RSS at those points of the last step, less the RSS before.
Nothing is asserted; results.md states APET's peak beside SpaRTA's and what the difference consists of.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import equal_k, harness
from benchmarks.harness import PeakSampler, SavedForBackward, TensorPeak, current_rss, trim_memory

METHODS = ("head", "full", "sparta", "lora", "apet-discrete", "apet-adjacent")
BUDGETS = {"default": (22_700, 227_000), "smoke": (500,)}
STEPS, BATCH, MAX_LEN = 3, 32, 64


def build(method: str, k: int, task: harness.Task) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The model with `method` applied and its trainable parameters (the caller seeds torch)."""
    if method == "head":
        model = harness.new_model(task)
        for name, p in model.named_parameters():
            p.requires_grad_(harness.is_head(name))
    else:
        apet_mask = method.removeprefix("apet-") if method.startswith("apet-") else "discrete"
        model, _ = equal_k.build(method.split("-")[0], k, task, seed=0, mask=apet_mask)
    return model, [p for p in model.parameters() if p.requires_grad]


def index_array_bytes() -> int:
    """Bytes of the index arrays APET's layout cache holds (tensors among each layout's cached attributes)."""
    import peft_apet.functional as functional

    def tensors(obj, depth: int = 0):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                yield from tensors(item, depth)
        elif depth < 2 and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                yield from tensors(value, depth + 1)

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layout in functional._LAYOUTS.values() for t in tensors(layout)}
    return sum(storages.values())


def measure(method: str, k: int, smoke: bool) -> dict:
    """One (method, k) in this process: the record described in the module docstring. The method is first applied
    to a tiny random BERT for one step, so that what it imports and initialises once is not counted."""
    warm = harness.load_model_task("tiny-bert", "rotten_tomatoes", max_len=8, test_size=8, subset=8)
    model, params = build(method, 50, warm)
    harness.train_step(model, torch.optim.AdamW(params), harness.collate(warm.splits["train"], warm), warm)
    del model, params
    task = harness.load_model_task("tiny-bert" if smoke else "minilm", "rotten_tomatoes", max_len=MAX_LEN,
                                   test_size=32, subset=64 if smoke else None)
    batch = harness.collate(task.splits["train"][:BATCH], task)
    trim_memory()
    rss0 = current_rss()
    torch.manual_seed(0)
    with PeakSampler() as sampler:
        model, params = build(method, k, task)
        built = current_rss() - rss0
        exact_k = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not harness.is_head(n))
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for step in range(STEPS):
            with SavedForBackward(exclude=list(model.parameters())) as saved, TensorPeak(step == STEPS - 1) as live:
                logits = harness.vocab_logits(model, batch, task, False)
                after_forward = current_rss() - rss0
                harness.loss_and_scores(logits, batch["labels"], task)[0].backward()
                after_backward = current_rss() - rss0
                state = harness.trainable_state_bytes(params, optimizer)  # grads still there; moments from step 2
                optimizer.step()
                after_step = current_rss() - rss0
                optimizer.zero_grad(set_to_none=True)
                del logits
    state = {**state, "optimizer": harness.trainable_state_bytes(params, optimizer)["optimizer"]}
    state["total"] = state["params"] + state["grads"] + state["optimizer"]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}
    return {"method": method, "k": exact_k,  # counted before training: SpaRTA's forward unfreezes what it merges into
            "target_k": k, "trainable": sum(p.numel() for p in params), "rss_after_build": built,
            "peak_rss": sampler.peak - rss0, "peak_tensor_bytes": live.peak, "saved_for_backward": saved.bytes,
            "state": state,
            "params_and_buffers": sum(held.values()), "index_arrays": index_array_bytes(),
            "rss_after_forward": after_forward, "rss_after_backward": after_backward, "rss_after_step": after_step,
            "tokens_per_step": int(batch["attention_mask"].sum())}


def run_isolated(method: str, k: int, threads: int) -> dict:
    """`measure` in a fresh process (`harness.run_fresh`)."""
    return harness.run_fresh("training_memory", ["--one", method, str(k), "--threads", str(threads)])


def write_report(out: Path, records: list[dict], command: str) -> None:
    mib = 2**20
    lines = ["# Where a training step's memory goes (MiniLM + Rotten Tomatoes, 32 x 64 tokens)", "",
             f"Command: `{command}`; {harness.machine_line()}; written {harness.now()}. MiB over the RSS before the "
             f"model was built; each method in a fresh process (mmap threshold {harness.MMAP_THRESHOLD} B).", "",
             "| k | method | exact k | peak RSS | peak tensor bytes in a step | after build | saved for backward | "
             "state (params+grads+AdamW) | params+buffers | APET index arrays | after forward / backward / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        tensor_peak = "–" if r["peak_tensor_bytes"] is None else f"{r['peak_tensor_bytes'] / mib:.1f}"
        lines.append(f"| {r['target_k']:,} | {r['method']} | {r['k']:,} | {r['peak_rss'] / mib:.1f} | {tensor_peak} | "
                     f"{r['rss_after_build'] / mib:.1f} | {r['saved_for_backward'] / mib:.1f} | "
                     f"{r['state']['total'] / mib:.1f} | {r['params_and_buffers'] / mib:.1f} | "
                     f"{r['index_arrays'] / mib:.2f} | {r['rss_after_forward'] / mib:.0f} / "
                     f"{r['rss_after_backward'] / mib:.0f} / {r['rss_after_step'] / mib:.0f} |")
    lines += ["", "Peak minus SpaRTA's, per budget (MiB; RSS, then tensor bytes in a step):", ""]
    for k in dict.fromkeys(r["target_k"] for r in records):
        by = {r["method"]: r for r in records if r["target_k"] == k}
        if "sparta" in by:
            lines.append(f"- k = {k:,}: " + ", ".join(
                f"{m} {(by[m]['peak_rss'] - by['sparta']['peak_rss']) / mib:+.1f}, "
                f"{_diff(by[m]['peak_tensor_bytes'], by['sparta']['peak_tensor_bytes'])}" for m in
                ("apet-discrete", "apet-adjacent", "lora") if m in by))
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _diff(a: int | None, b: int | None) -> str:
    return "–" if a is None or b is None else f"{(a - b) / 2**20:+.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = harness.arguments(__doc__, "training_memory", smoke="tiny random BERT, one budget (the test)",
                               threads=1)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)  # a fresh process's run
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        torch.set_num_threads(args.threads)
        harness.write_json(args.record, measure(args.one[0], int(args.one[1]), args.smoke))
        return 0
    mode = "smoke" if args.smoke else "default"
    out = args.out or harness.results_folder("training_memory")
    command = harness.start("training_memory", argv, out, args.threads)
    log = harness.logger(out / "run.log")
    log(f"start {command}")
    records = []
    for k in BUDGETS[mode]:
        for method in METHODS:  # the smoke run (the test) in this process: quicker, and RSS does not matter there
            record = measure(method, k, True) if args.smoke else run_isolated(method, k, args.threads)
            log(f"k={k} {method}: peak +{record['peak_rss'] / 2**20:.1f} MiB, saved "
                f"{record['saved_for_backward'] / 2**20:.1f} MiB, state {record['state']['total'] / 2**20:.1f} MiB")
            records.append(record)
    harness.write_json(out / "results.json", {"command": command, "machine": harness.machine(),
                                              "date": harness.now(), "records": records}, end="\n")
    write_report(out, records, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
