"""Model cards of APET adapters: the `README.md` that `save_pretrained`, `push_to_hub` and `Trainer` write.

PEFT writes a card in `PeftModel.save_pretrained` (and `Trainer.create_model_card` rewrites it) through
`PeftModel.create_or_update_model_card`. `install_model_card_hook` wraps that method so that, for models with APET
adapters, the card also gets the `apet` tags and a section between two HTML comments: base model, parts, masks,
the exact trainable count, metrics (see `set_card_metrics`) and how to load the adapter (`pip install peft-apet`,
`import peft_apet`). Rewriting replaces the section, so writing a card twice gives the same card.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
from collections import defaultdict

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel

from .config import APETConfig
from .layer import APETLayer
from .operations import OPERATION_OF_ROLE
from .tokens import TOKENS_ROLE, token_layers

SECTION_START = "<!-- peft-apet:start -->"
SECTION_END = "<!-- peft-apet:end -->"
TAGS = ("apet", "peft-apet")
LOAD_LINE = "Loading this adapter needs `pip install peft-apet` and `import peft_apet` (which registers the APET type)."
_METRICS_ATTRIBUTE = "apet_card_metrics"
# `save_pretrained(selected_adapters=...)` while it runs: the card then describes those adapters only.
_SAVED_ADAPTERS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("apet_saved_adapters",
                                                                                  default=None)
_AUTO_CLASS = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
               "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def set_card_metrics(model: PeftModel, metrics: dict[str, float]) -> None:
    """Attach `{name: value}` metrics to `model`; the cards it writes from then on list them."""
    model.__dict__[_METRICS_ATTRIBUTE] = dict(metrics)


def _apet_adapters(model: PeftModel) -> list[str]:
    """The APET adapters a card describes: all of `model`'s, or those `save_pretrained` was asked to save."""
    selected = _SAVED_ADAPTERS.get()
    return [name for name, config in model.peft_config.items()
            if isinstance(config, APETConfig) and (selected is None or name in selected)]


def _entries_by_operation(model: PeftModel, adapter_name: str) -> tuple[dict[str, int], dict[str, int]]:
    """Trainable entries and wrapped modules of each operation of an adapter, read from its layers."""
    entries: dict[str, int] = defaultdict(int)
    modules: dict[str, set[str]] = defaultdict(set)
    for module_name, module in model.named_modules():
        if isinstance(module, APETLayer) and adapter_name in module.apet_weights:
            for role, weight in module.apet_weights[adapter_name].items():
                operation = OPERATION_OF_ROLE[role].name
                entries[operation] += weight.num_entries
                modules[operation].add(module_name)
    for module_name, layer in token_layers(model, adapter_name):  # rows of `trainable_token_indices`, in the budget
        entries[TOKENS_ROLE] += layer.trainable_tokens_delta[adapter_name].numel()
        modules[TOKENS_ROLE].add(module_name)
    return dict(entries), {op: len(names) for op, names in modules.items()}


def _is_local_path(name: str | None) -> bool:
    return bool(name) and (os.path.isabs(name) or os.path.exists(name))


def card_section(model: PeftModel, adapter_names: list[str] | None = None) -> str:
    """The Markdown section describing the APET adapters of `model` (all of them by default)."""
    base = model.get_base_model()
    base_name = getattr(base, "name_or_path", "") or "(unknown)"
    lines = [SECTION_START, "## APET adapter", "",
             "Trained with [peft-apet](https://pypi.org/project/peft-apet/): Arbitrary Parameter-Efficient Tuning "
             "(APET) as a Hugging Face PEFT method.", "", LOAD_LINE, ""]
    for name in adapter_names or _apet_adapters(model):
        config = model.peft_config[name]
        entries, modules = _entries_by_operation(model, name)
        task_type = getattr(config.task_type, "value", config.task_type)  # peft.TaskType or its string
        auto_class = _AUTO_CLASS.get(task_type, "AutoModel")
        where = " (a local folder when trained)" if _is_local_path(base_name) else ""
        lines += [f"### Adapter `{name}`", "",
                  f"- base model: `{base_name}`{where}",
                  f"- task type: `{task_type}`",
                  f"- exact trainable adapter entries: {sum(entries.values()):,}",
                  f"- modules trained in full besides the adapter (`modules_to_save`): "
                  f"{', '.join(sorted(set(config.modules_to_save or []))) or 'none'}", "",
                  "| part | targets | modules | mask | trainable entries |", "|---|---|---|---|---|"]
        for part in config.parts:
            targets = part.target_modules if part.target_modules is not None else "default"
            targets = ", ".join(targets) if isinstance(targets, list) else targets
            mask = part.mask or "none (whole tensors)"
            if part.mask == "adjacent":
                mask += f" (axis {part.mask_axis})"
            lines.append(f"| {part.operation} | {targets} | {modules.get(part.operation, 0)} | {mask} | "
                         f"{entries.get(part.operation, 0):,} |")
        if TOKENS_ROLE in entries:
            lines.append(f"| token rows (`trainable_token_indices`) | embeddings | {modules[TOKENS_ROLE]} | "
                         f"none (whole rows) | {entries[TOKENS_ROLE]:,} |")
        where_saved = "" if name == "default" else f', subfolder="{name}", adapter_name="{name}"'

        lines += ["", "```python", "import peft_apet  # registers the APET PEFT type", "from peft import PeftModel",
                  f"from transformers import {auto_class}", "",
                  f'base = {auto_class}.from_pretrained("{base_name}")',
                  f'model = PeftModel.from_pretrained(base, "<this repository or folder>"{where_saved})', "```", ""]
    metrics = model.__dict__.get(_METRICS_ATTRIBUTE)
    if metrics:
        lines += ["### Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in metrics.items()]
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines)


def _replace_section(text: str, section: str) -> str:
    """`text` with its APET section replaced by `section` (appended if absent); the same text for the same input."""
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    before, after = (text[:start], text[end + len(SECTION_END):]) if start != -1 and end > start else (text, "")
    after = after.strip("\n")
    return before.rstrip("\n") + "\n\n" + section + "\n" + (after + "\n" if after else "")


HEADER_START = "<!-- peft-apet:load -->"
HEADER_END = "<!-- peft-apet:load-end -->"


def _lora_shaped(model: PeftModel, adapter_name: str) -> bool:
    return all(part.operation == "lora" for part in model.peft_config[adapter_name].parts)


def card_header(model: PeftModel) -> str:
    """The lines at the top of an APET adapter's card: how to load it and, for LoRA-shaped adapters, to export it."""
    lines = [HEADER_START,
             "**An APET adapter for PEFT.** To load it: `pip install peft-apet`, then `import peft_apet` before "
             "`PeftModel.from_pretrained` (without the import PEFT fails with `KeyError: 'APET'`)."]
    lora = [name for name in _apet_adapters(model) if _lora_shaped(model, name)]
    if lora:
        lines += ["", f"Adapter{'s' if len(lora) > 1 else ''} {', '.join(f'`{n}`' for n in lora)} "
                  f"{'are' if len(lora) > 1 else 'is'} LoRA-shaped: `peft_apet.export_lora(model, \"lora-folder\", "
                  f"adapter_name=\"{lora[0]}\")` writes a standard PEFT LoRA folder that loads without peft-apet "
                  "(PEFT; LoRA servers read the same format)."]
    return "\n".join([*lines, HEADER_END])


def _replace_header(text: str, header: str) -> str:
    """`text` with its APET loading lines replaced by `header`, or `header` put first; idempotent."""
    start, end = text.find(HEADER_START), text.find(HEADER_END)
    if start != -1 and end > start:
        text = text[:start] + text[end + len(HEADER_END):]
    return header + "\n\n" + text.lstrip("\n")


def update_model_card(model: PeftModel, output_dir: str) -> None:
    """Add the APET tags and section to `output_dir/README.md` (created if missing); no-op without APET adapters."""
    if not _apet_adapters(model):
        return
    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    tags = list(card.data.tags or [])
    # The Hub refuses a `base_model` that is not a model id: a local folder is named in the section instead.
    if _is_local_path(card.data.base_model):
        tags = [t for t in tags if t != f"base_model:adapter:{card.data.base_model}"]
        card.data.base_model = None
    card.data.tags = tags + [t for t in TAGS if t not in tags]
    card.text = _replace_header(_replace_section(card.text, card_section(model)), card_header(model))
    card.save(filename)


def install_model_card_hook() -> None:
    """Make PeftModel's cards describe APET adapters (idempotent).

    Two places: `create_or_update_model_card` (called by `save_pretrained` and the `Trainer`), and the upload
    step of `push_to_hub`, because transformers' `push_to_hub` overwrites the saved README.md with a card of its
    own between saving and uploading. `save_pretrained` is wrapped too, only to pass its `selected_adapters` on:
    the card describes the adapters saved.
    """
    original_card = PeftModel.create_or_update_model_card
    if getattr(original_card, "_apet_hook", False):
        return

    @functools.wraps(original_card)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        original_card(self, output_dir)
        update_model_card(self, output_dir)

    original_upload = PeftModel._upload_modified_files
    original_save = PeftModel.save_pretrained
    save_signature = inspect.signature(original_save)

    @functools.wraps(original_save)
    def save_pretrained(self: PeftModel, *args, **kwargs):
        selected = save_signature.bind(self, *args, **kwargs).arguments.get("selected_adapters")
        token = _SAVED_ADAPTERS.set(list(selected) if selected is not None else None)
        try:
            return original_save(self, *args, **kwargs)
        finally:
            _SAVED_ADAPTERS.reset(token)

    @functools.wraps(original_upload)
    def _upload_modified_files(self: PeftModel, working_dir: str, *args, **kwargs):
        update_model_card(self, str(working_dir))
        return original_upload(self, working_dir, *args, **kwargs)

    create_or_update_model_card._apet_hook = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files
    PeftModel.save_pretrained = save_pretrained
