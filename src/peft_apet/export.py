"""Serving APET adapters where `peft_apet` is not installed: export to a standard PEFT LoRA folder.

PEFT without plugins, and LoRA servers such as vLLM or TGI, load LoRA folders: an `adapter_config.json`
of a `LoraConfig` and `lora_A` / `lora_B` weights in `adapter_model.safetensors`. An APET adapter whose only part
is `lora` is such a LoRA, masked or not: a masked `A` or `B` is a LoRA matrix with zeros off the mask, and
`scaling = lora_alpha / r` is PEFT's. `export_lora` writes it in that form, together with the `modules_to_save`
heads and the trainable token rows (`trainable_token_indices`), under the key names PEFT saves them with.

Parts LoRA cannot express (`delta`, `bias`, `adapter`, `prompt`) are refused; for a plain model, merge the
mergeable ones (`delta`, `bias`, `lora`) with `merge_and_unload()` and save that with `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .checks import _APET_KEY, PEFT_PREFIX
from .config import APETConfig
from .layer import APETLayer, merged_layers
from .modules import is_conv1d
from .operations import MERGEABLE_OPERATIONS
from .packing import is_packed_key

LORA_EXPRESSIBLE = ("lora",)


def _apet_config(peft_model: PeftModel, adapter_name: str) -> APETConfig:
    if not isinstance(peft_model, PeftModel):
        raise ValueError("`peft_model` must be a peft.PeftModel with an APET adapter, got "
                         f"{type(peft_model).__name__}.")
    config = peft_model.peft_config.get(adapter_name)
    if config is None:
        raise ValueError(f"`adapter_name`={adapter_name!r} is not an adapter of this model; adapters: "
                         f"{sorted(peft_model.peft_config)}.")
    if not isinstance(config, APETConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not an APET one; save it with "
                         "`save_pretrained` instead.")
    return config


def check_lora_exportable(peft_model: PeftModel, adapter_name: str = "default") -> APETConfig:
    """Raise ValueError if adapter `adapter_name` of `peft_model` cannot be written as a PEFT LoRA; return its config.

    Args:
        peft_model: a `PeftModel` holding the APET adapter.
        adapter_name: the adapter to check.
    """
    config = _apet_config(peft_model, adapter_name)
    other = [p.operation for p in config.parts if p.operation not in LORA_EXPRESSIBLE]
    if other:
        mergeable = [op for op in other if op in MERGEABLE_OPERATIONS]
        hint = ("For a plain transformers model, merge the adapter instead: `model.merge_and_unload()` folds delta, "
                "bias and lora parts into the base weights, then `save_pretrained(folder)`.")
        if len(mergeable) < len(other):
            hint += " Adapter and prompt parts cannot be merged either: serve such adapters with peft-apet installed."
        raise ValueError(f"cannot export APET adapter {adapter_name!r} as LoRA: its parts {other} are not LoRA "
                         f"structures (only {list(LORA_EXPRESSIBLE)} parts are). {hint} Nothing was written.")
    merged = merged_layers(peft_model, adapter_name)
    if merged:
        raise ValueError(f"APET adapter {adapter_name!r} is merged into the base weights of {merged[:3]}: exporting "
                         "it would apply it twice. Call `unmerge_adapter()` first. Nothing was written.")
    return config


def lora_state_dict(peft_model: PeftModel, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT LoRA checkpoint of an APET lora adapter and the LoRA settings read off its layers.

    Returns:
        `(state_dict, settings)`: `state_dict` maps `base_model.model.<module>.lora_A.weight` (shape `(r, in)`) and
        `.lora_B.weight` (`(out, r)`) to the dense, masked matrices, plus the adapter's `modules_to_save` and
        trainable-token tensors under PEFT's own keys; `settings` has `target_modules` (exact module names) and
        `fan_in_fan_out` (True where the targets are transformers `Conv1D`, as GPT-2's).
    """
    check_lora_exportable(peft_model, adapter_name)
    state: dict[str, torch.Tensor] = {}
    targets, conv1d = [], []
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, APETLayer) or adapter_name not in module.apet_weights:
            continue
        weights = module.apet_weights[adapter_name]
        if "lora_A" not in weights:
            continue
        for role in ("lora_A", "lora_B"):
            state[f"{PEFT_PREFIX}{name}.{role}.weight"] = weights[role].dense().detach().clone().contiguous()
        targets.append(name)
        conv1d.append(is_conv1d(module.get_base_layer()))
    # modules_to_save heads and trainable token rows: PEFT's wrappers save them the same way for every method
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name,
                                                save_embedding_layers=False).items():
        if not _APET_KEY.match(key.removeprefix(PEFT_PREFIX)) and not is_packed_key(key):
            state[key] = value.detach().clone().contiguous()
    return state, {"target_modules": targets, "fan_in_fan_out": bool(conv1d) and all(conv1d),
                   "mixed_conv1d": any(conv1d) and not all(conv1d)}


def export_lora(peft_model: PeftModel, output_dir: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Write APET adapter `adapter_name` of `peft_model` as a standard PEFT LoRA folder.

    The folder holds `adapter_config.json` (a `LoraConfig` with the adapter's `r`, `lora_alpha`, `lora_dropout`,
    exact target module names, `modules_to_save`, `trainable_token_indices`, `task_type` and
    `base_model_name_or_path`), `adapter_model.safetensors` (dense `lora_A` `(r, in)` and `lora_B` `(out, r)`,
    zeros off the masks) and a model card. `PeftModel.from_pretrained(base, output_dir)` then loads it without
    `peft_apet`, with the same outputs.

    Args:
        peft_model: a `PeftModel` whose adapter `adapter_name` is an APET adapter made of a `lora` part only.
        output_dir: folder to write (created if missing; existing files of the same names are replaced).
        adapter_name: the adapter to export.

    Returns:
        The `LoraConfig` written.

    Raises:
        ValueError: the adapter has parts LoRA cannot express (delta, bias, adapter, prompt), is merged, or is not
            an APET adapter. Raised before anything is written.
    """
    config = check_lora_exportable(peft_model, adapter_name)
    part = config.part("lora")
    state, settings = lora_state_dict(peft_model, adapter_name)
    if not settings["target_modules"]:
        raise ValueError(f"APET adapter {adapter_name!r} has no lora layers in this model. Nothing was written.")
    lora_config = LoraConfig(
        r=part.r,
        lora_alpha=part.lora_alpha,
        lora_dropout=part.lora_dropout,
        target_modules=settings["target_modules"],
        fan_in_fan_out=settings["fan_in_fan_out"],
        bias="none",
        modules_to_save=list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else None,
        trainable_token_indices=config.trainable_token_indices,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    output_dir = os.fspath(output_dir)
    _check_not_another_adapter(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    lora_config.save_pretrained(output_dir)
    save_file(state, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    _write_card(output_dir, config, adapter_name, settings)
    return lora_config


def _check_not_another_adapter(output_dir: str) -> None:
    """Refuse to overwrite a folder holding an adapter other than a LoRA (e.g. the APET adapter being exported)."""
    path = os.path.join(output_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError):
        peft_type = "unreadable"
    if peft_type != "LORA":
        raise ValueError(f"`output_dir` {output_dir} already holds an adapter of type {peft_type} ({path}); export "
                         "to another folder rather than overwrite it. Nothing was written.")


def _write_card(output_dir: str, config: APETConfig, adapter_name: str, settings: dict) -> None:
    card = ModelCard.from_template(ModelCardData(library_name="peft", tags=["lora", "apet-export"]))
    part = config.part("lora")
    mask = part.mask or "none"
    lines = [
        "# LoRA adapter exported from APET",
        "",
        f"A standard PEFT LoRA (r={part.r}, lora_alpha={part.lora_alpha:g}) written by `peft_apet.export_lora` from "
        f"the APET adapter `{adapter_name}` (mask: {mask}; masked entries are zeros). It loads with PEFT alone "
        "(`PeftModel.from_pretrained(base, folder)`) and with servers that read PEFT LoRA folders.",
        "",
        f"- base model: `{config.base_model_name_or_path}`",
        f"- task type: `{config.task_type}`",
        f"- targets: {len(settings['target_modules'])} modules (exact names in `adapter_config.json`)",
    ]
    if settings["mixed_conv1d"]:
        lines.append("- targets mix `Conv1D` and `nn.Linear` layers: PEFT sets `fan_in_fan_out` per layer when loading")
    card.text = "\n".join(lines) + "\n"
    card.save(os.path.join(output_dir, "README.md"))


def modules_gaining_a_bias(model: nn.Module, adapter_names: list[str]) -> list[str]:
    """Names of the layers whose base layer has (or had) no bias and gets one by merging a `bias` part of
    `adapter_names`: after `merge_and_unload` their biases are new tensors the architecture may not declare."""
    return [name for name, module in model.named_modules()
            if isinstance(module, APETLayer) and (module._created_bias or (
                getattr(module.get_base_layer(), "bias", False) is None
                and any(a in module.apet_weights and "bias" in module.apet_weights[a] for a in adapter_names)))]


def warn_new_biases(model: nn.Module, names: list[str]) -> None:
    """Warn that a merged model has biases its architecture may not load back (see `modules_gaining_a_bias`)."""
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} modules)" if len(names) > 3 else "")
    warnings.warn(
        f"merging an APET bias part gave layers without a bias one ({shown}). The merged model computes the adapter's "
        f"outputs, but `save_pretrained` folders load those biases only where {type(model).__name__}'s config declares "
        "them: transformers drops them otherwise (UNEXPECTED keys). Set the config's bias flags before saving where "
        "the architecture has them (e.g. `config.attention_bias = config.mlp_bias = True` for Llama when every "
        "projection got a bias), or serve the adapter unmerged.",
        UserWarning, stacklevel=4)
