"""Default `target_modules` of each operation, per transformers `model_type`.

Lists are module-name suffixes, strings are regexes matched against the full module name (PEFT's syntax).
Two special strings: `"all-linear"` (every `nn.Linear`/`Conv1D` but the output head) and `"all-with-bias"`
(every module that owns a bias vector: linear layers and LayerNorms, as BitFit trains).
"""

from __future__ import annotations

ALL_LINEAR = "all-linear"
ALL_WITH_BIAS = "all-with-bias"

_BERT_LIKE = {
    # Paper (Hu et al.; APET appendix B): LoRA on the attention query and value projections.
    "lora": ["query", "value"],
    # Houlsby: after the attention output projection (attention.output.dense) and the feed-forward output
    # projection (layer.N.output.dense); the suffix "output.dense" matches both.
    "adapter": ["output.dense"],
    "delta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "bias": ALL_WITH_BIAS,
}
_LLAMA_LIKE = {
    "lora": ["q_proj", "v_proj"],
    "adapter": ["o_proj", "down_proj"],
    "delta": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # Bias-free model: the Add operation puts new bias vectors on the attention and feed-forward projections.
    "bias": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
_T5_LIKE = {
    "lora": ["q", "v"],
    "adapter": r".*\.(SelfAttention\.o|DenseReluDense\.wo)",
    "delta": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "bias": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}

DEFAULT_TARGET_MODULES: dict[str, dict[str, list[str] | str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "gpt2": {
        "lora": ["c_attn"],
        "adapter": ["attn.c_proj", "mlp.c_proj"],
        "delta": ["c_attn", "c_proj", "c_fc"],
        "bias": ALL_WITH_BIAS,
    },
    "llama": _LLAMA_LIKE,
    "mpnet": {
        "lora": ["attn.q", "attn.v"],
        # Houlsby places: after the attention output projection (attention.attn.o) and the feed-forward output
        # projection (layer.N.output.dense).
        "adapter": ["attn.o", "output.dense"],
        "delta": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
        "bias": ALL_WITH_BIAS,
    },
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
}


def default_target_modules(model_type: str | None, operation: str) -> list[str] | str:
    """The default targets of `operation` for `model_type`; raises ValueError if there is none."""
    defaults = DEFAULT_TARGET_MODULES.get(model_type or "")
    if defaults is not None:
        return defaults[operation]
    if operation == "bias":
        return ALL_WITH_BIAS
    raise ValueError(
        f"no default `target_modules` for operation '{operation}' on model_type {model_type!r} (known: "
        f"{sorted(DEFAULT_TARGET_MODULES)}); pass `target_modules=` (a list of module-name suffixes, a regex, "
        f"or '{ALL_LINEAR}')."
    )
