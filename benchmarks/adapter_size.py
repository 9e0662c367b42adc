"""Size of a saved APET adapter per trainable parameter: the packed format against peft-apet 0.1's per-module files.

    python -m benchmarks.adapter_size                      # the grid below, about a minute on one CPU core
    python -m benchmarks.adapter_size --smoke --out /tmp/x # two points on BERT-base (the test)

Grid: k in {10^3, 10^4, 10^5, 10^6} x mask {discrete, adjacent} x model, a `delta` part (sparse fine-tuning of the
base weights, fp32 values) on
- BERT-base (`BertConfig()` defaults), targets query/value: 24 tensors of 768 x 768;
- a Llama of about 0.5B parameters shaped like Qwen2-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads,
  intermediate 4864, vocabulary 151,936), all seven linear layers of every block: 168 tensors.

Only shapes matter for a random mask, so no base weight is materialised: every parameter of the base model is one
zero expanded to its shape (no memory). Each point saves with `save_pretrained` (the packed file of
`peft_apet.packing`) and measures the whole `adapter_model.safetensors`; it loads it back and checks every value and
index; it also writes the same adapter as 0.1 did (per module `values` and `index`, discrete indices Elias-Fano coded
per module) for comparison. The bound: no file can store an fp32 value per entry and a k-subset of the N entries
in fewer than `4 k + log2 C(N, k) / 8` bytes, header excluded (for adjacent masks the subset is of lines).

Writes `benchmarks/results/adapter_size/results.json`; `discussion.md` next to it is written by hand.
"""

from __future__ import annotations

import math
import struct
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from benchmarks import harness
from peft_apet import APETConfig, APETLayer
from peft_apet.masks import line_length, num_lines

KS = (1_000, 10_000, 100_000, 1_000_000)
MASKS = ("discrete", "adjacent")
# whole file / trainable parameters, fp32 values: (mask, smallest k) -> at most
TARGETS = {("discrete", 1_000): 6.0, ("adjacent", 1_000): 4.5, ("adjacent", 10_000): 4.1}


def bert_base() -> nn.Module:
    with torch.device("meta"):
        return BertModel(BertConfig(), add_pooling_layer=False)


def llama_half_b() -> nn.Module:
    config = LlamaConfig(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


MODELS = {
    "bert-base q/v": (bert_base, ["query", "value"], "FEATURE_EXTRACTION"),
    "llama-0.5b all-linear": (llama_half_b, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], "CAUSAL_LM"),
}


def shapes_only(model: nn.Module) -> nn.Module:
    """`model` (on meta) with every parameter and buffer a zero expanded to its shape: real CPU tensors, no memory."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    fake = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
                    store[name] = nn.Parameter(fake, requires_grad=False) if store is module._parameters else fake
    return model


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def weights(model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"{name}.{role}": (w.values.detach(), w.index) for name, m in model.named_modules()
            if isinstance(m, APETLayer) for role, w in m.apet_weights["default"].items()}


def per_module_bytes(model: PeftModel, folder: Path) -> int:
    """Bytes of the same adapter as peft-apet 0.1 wrote it: per module `values` and `index`."""
    marker = ".apet_weights.default."
    state = {k.replace(marker, ".apet_weights."): v.contiguous() for k, v in model.state_dict().items() if marker in k}
    save_file(state, folder / "per_module.safetensors", metadata={"format": "pt"})
    return (folder / "per_module.safetensors").stat().st_size


def bound_bytes(model: PeftModel, k: int) -> float:
    """`4 k + log2 C(N, K) / 8`, the ids being entries (discrete) or lines (adjacent: K lines kept of N)."""
    n = ids = 0
    for m in model.modules():
        if not isinstance(m, APETLayer):
            continue
        for w in m.apet_weights["default"].values():
            if w.mask == "discrete":
                n, ids = n + math.prod(w.shape), ids + w.num_entries
            else:
                length = line_length(w.shape, w.axis)
                n, ids = n + num_lines(w.shape, w.axis), ids + math.ceil(w.num_entries / length)
    return 4 * k + log2_binomial(n, ids) / 8


def measure(model_name: str, mask: str, k: int, folder: Path) -> dict:
    build, targets, task_type = MODELS[model_name]
    start = time.perf_counter()
    config = APETConfig.delta(mask=mask, num_trainable_params=k, target_modules=targets, task_type=task_type,
                              init_weights=False)
    model = get_peft_model(shapes_only(build()), config)
    model.save_pretrained(folder)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0] + 8
    index_bytes = load_file(path)["apet_packed.index"].numel()
    loaded = PeftModel.from_pretrained(shapes_only(build()), folder)
    saved, back = weights(model), weights(loaded)
    assert saved.keys() == back.keys() and all(
        torch.equal(v, back[key][0]) and torch.equal(i, back[key][1]) for key, (v, i) in saved.items()), model_name
    old = per_module_bytes(model, folder)
    bound = bound_bytes(model, k)
    limit = min((v for (m, smallest), v in TARGETS.items() if m == mask and k >= smallest), default=None)
    return {"model": model_name, "mask": mask, "k": k, "tensors": len(saved), "file_bytes": len(data),
           "header_bytes": header, "B_per_param": len(data) / k, "payload_B_per_param": (len(data) - header) / k,
           "index_B_per_entry": index_bytes / k, "bound_B_per_param": bound / k,
           "bound_plus_header_B_per_param": (bound + header) / k, "per_module_0_1_B_per_param": old / k,
           "target": limit, "met": None if limit is None else len(data) / k <= limit,
           "target_possible": None if limit is None else (bound + header) / k <= limit,
           "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    args = harness.arguments(__doc__, "adapter_size", smoke="two points on BERT-base", threads=None).parse_args(argv)
    out = args.out or harness.results_folder("adapter_size")
    command = harness.start("adapter_size", argv, out, threads=None)
    grid = [(m, mask, k) for m in MODELS for mask in MASKS for k in KS]
    if args.smoke:
        grid = [("bert-base q/v", "discrete", 1_000), ("bert-base q/v", "adjacent", 10_000)]
    rows = []
    for model_name, mask, k in grid:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(model_name, mask, k, Path(tmp)))
        r = rows[-1]
        print(f"{model_name:24s} {mask:9s} k={k:>9,}  {r['B_per_param']:6.3f} B/param (bound+header "
              f"{r['bound_plus_header_B_per_param']:.3f}, 0.1: {r['per_module_0_1_B_per_param']:.2f})  "
              f"target {r['target']} met={r['met']}  {r['seconds']} s", flush=True)
    harness.write_json(out / "results.json", {"meta": {**harness.machine(), "date": harness.now(), "command": command},
                                              "rows": rows}, end="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
