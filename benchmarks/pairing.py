"""How much of a masked LoRA / adapter budget can learn, with independent and with aligned masks (issue 16, part 1).

On a MiniLM-sized BERT built from a config (6 layers, hidden 384, random weights, seed 0), for LoRA r=8 and a
bottleneck-24 adapter (relu and gelu), both masks, both pairings and budgets k = 400 ... 25,600, it reports:
- `unlearnable_structural`: trainable entries whose rank unit has no trainable entry in the other matrix
  (`model.base_model.learnable_entries()`), which can never receive a gradient;
- `zero_gradient`: trainable entries whose gradient stayed exactly zero over 4 SGD steps (lr 0.5, batches of
  8 x 32 random tokens, random labels): the structural ones, plus units a relu switched off on every token.

    python -m benchmarks.pairing                 # writes benchmarks/results/pairing/results.{json,md} (14 min shared)
    python -m benchmarks.pairing --smoke --out DIR
"""

from __future__ import annotations

import time
import warnings

import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import peft_apet
from benchmarks import harness
from peft_apet import APETConfig

VOCAB = 1000


def base_model(smoke: bool) -> BertForSequenceClassification:
    torch.manual_seed(0)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if smoke else \
        dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, **size))


def zero_gradient_entries(model, steps: int, batch: int, length: int) -> int:
    """Trainable APET entries whose gradient stayed exactly zero over `steps` SGD steps."""
    values = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".values")]
    touched = [torch.zeros_like(p, dtype=torch.bool) for p in values]
    optimizer = torch.optim.SGD(values, lr=0.5)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        labels = torch.randint(0, 2, (batch,), generator=generator)
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        for t, p in zip(touched, values):
            t |= p.grad != 0
        optimizer.step()
    return sum(int((~t).sum()) for t in touched)


def measure(part: str, activation: str | None, mask: str, pairing: str, k: int, smoke: bool) -> dict:
    if part == "lora":
        config = APETConfig.lora(r=8, mask=mask, num_trainable_params=k, mask_pairing=pairing, task_type="SEQ_CLS")
    else:
        config = APETConfig.adapter(bottleneck=24, activation=activation, mask=mask, num_trainable_params=k,
                                    mask_pairing=pairing, task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unlearnable-budget warning is what we measure
        model = get_peft_model(base_model(smoke), config)
    learnable, trainable = model.base_model.learnable_entries()
    zero = zero_gradient_entries(model, steps=2 if smoke else 4, batch=8, length=8 if smoke else 32)
    return {"part": part, "activation": activation, "mask": mask, "pairing": pairing, "k": k, "trainable": trainable,
            "unlearnable_structural": trainable - learnable, "zero_gradient": zero}


def table(rows: list[dict]) -> str:
    budgets = sorted({r["k"] for r in rows})
    head = "| part | mask | pairing | " + " | ".join(f"k = {k:,}" for k in budgets) + " |"
    lines = [head, "|" + "---|" * (3 + len(budgets))]
    keys = dict.fromkeys((r["part"], r["activation"], r["mask"], r["pairing"]) for r in rows)
    for part, activation, mask, pairing in keys:
        cells = []
        for k in budgets:
            r = next(x for x in rows if (x["part"], x["activation"], x["mask"], x["pairing"], x["k"])
                     == (part, activation, mask, pairing, k))
            share = r["unlearnable_structural"] / r["trainable"], r["zero_gradient"] / r["trainable"]
            cells.append(f"{share[0]:.0%} / {share[1]:.0%}")
        name = part if activation is None else f"{part} ({activation})"
        lines.append(f"| {name} | {mask} | {pairing} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = harness.arguments(__doc__.splitlines()[0], "pairing", smoke="tiny model, two budgets, two steps",
                               threads=None)
    args = parser.parse_args(argv)
    out = args.out or harness.results_folder("pairing")
    command = harness.start("pairing", argv, out, threads=None)
    budgets = [40, 400] if args.smoke else [400, 1_600, 6_400, 25_600]
    parts = [("lora", None), ("adapter", "relu"), ("adapter", "gelu")]
    start = time.time()
    rows = [measure(part, act, mask, pairing, k, args.smoke) for part, act in parts for mask in ("discrete", "adjacent")
            for pairing in ("independent", "aligned") for k in budgets]
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
             "seconds": round(time.time() - start, 1), "torch": torch.__version__, "peft_apet": peft_apet.__version__}
    harness.write_json(out / "results.json", {"meta": stamp, "rows": rows}, end="\n")
    (out / "results.md").write_text(
        "# Budget that can learn: independent vs aligned masks\n\n"
        f"{stamp['date']}, `{stamp['command']}`, {stamp['seconds']} s, torch {stamp['torch']}. Each cell: share of "
        "the k trainable entries that can never receive a gradient (structural) / whose gradient stayed exactly "
        "zero over the training steps (see `benchmarks/pairing.py`).\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
