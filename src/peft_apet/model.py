"""`APETModel`: the PEFT tuner that places APET layers into a model.

Injection follows PEFT's `BaseTuner.inject_adapter`; APET adds one step before any module is touched:
`_prepare_model` plans the adapter (`peft_apet.plan.plan_adapter`: every part's targets, the exact budget split, and
the masks of data-free strategies; `ValueError` on bad targets or budgets), checks an adapter folder being loaded
against the plan (`peft_apet.checks.check_checkpoint_fits_plan`), and keeps the plan in `building_plan`; each matched
module is then wrapped once, with its final masks, from its `ModulePlan`. After injection the chosen per-module
counts are recorded in the adapter's config (`peft_apet.plan.record_mask_counts`); for a config with mask strategies
that is a copy, so the object the user passed can be reused on another model or adapter.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .checks import (
    check_adapter_name,
    check_checkpoint_fits_plan,
    check_every_tensor_is_saved,
    check_merge_is_finite,
    check_nothing_merged,
    check_state_fits_model,
)
from .config import APETConfig
from .export import modules_gaining_a_bias, warn_new_biases
from .layer import APETLayer, Linear, OutputLayer, PromptEmbedding
from .loading import adapter_folder_being_loaded, check_not_loaded_by_transformers
from .modules import storage_key
from .operations import OPERATION_OF_ROLE
from .packing import is_packed_key, pack_entries
from .plan import (
    TASK_HEADS,
    AdapterPlan,
    ModulePlan,
    TensorPlan,
    plan_adapter,
    record_mask_counts,
    summary_table,
)
from .prompt import custom_callbacks_on_real_tokens, prepend_prompt, real_tokens_only
from .quantized import check_quantized_mergeable, guard_cpu_repacking, unpack_cpu_repacked_4bit_
from .strategies import data_free_score_fn, is_data_driven
from .tokens import TOKENS_ROLE, check_token_rows_match_other_adapters, token_layers


def _prompt_token_ids(config: APETConfig) -> list[int] | None:
    """The `num_virtual_tokens` ids of `prompt_init_text` (repeated or cut to length) for a prompt part initialised
    from text, else None; read before any module is replaced, so a tokenizer that cannot be loaded changes nothing."""
    part = config.part("prompt")
    if part is None or part.prompt_init != "text":
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(part.tokenizer_name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"part 'prompt': `tokenizer_name_or_path`={part.tokenizer_name_or_path!r} cannot be loaded "
                         f"for `prompt_init_text` ({type(e).__name__}: {e}). Nothing was changed.") from e
    ids = tokenizer(part.prompt_init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("part 'prompt': `prompt_init_text` encodes to no tokens.")
    n = part.num_virtual_tokens
    return (ids * (n // len(ids) + 1))[:n]


LAYER_CLASSES = {"linear": Linear, "output": OutputLayer, "embedding": PromptEmbedding}


class APETModel(BaseTuner):
    """Arbitrary Parameter-Efficient Tuning (APET) tuner.

    Created by `peft.get_peft_model(model, APETConfig(...))` once `peft_apet` is imported; see `APETConfig`.

    Example:
        ```py
        >>> import peft_apet
        >>> from peft import get_peft_model
        >>> config = peft_apet.APETConfig.lora(r=8, mask="discrete", num_trainable_params=10_000)
        >>> model = get_peft_model(base_model, config)
        >>> model.print_trainable_parameters()  # trainable params: 10,000 || ...
        ```
    """

    prefix: str = "apet_"
    tuner_layer_cls = APETLayer
    target_module_mapping: dict[str, list[str]] = {}  # APET resolves defaults per part: peft_apet.targets

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: APETConfig, model_config: dict) -> APETConfig:
        return peft_config

    # The plan of the adapter being injected, and the token ids of a prompt initialised from text: set by
    # `_prepare_model`, read by `_create_and_replace`, None otherwise.
    building_plan: AdapterPlan | None = None
    prompt_ids: list[int] | None = None
    injecting: str | None = None  # the name of that adapter

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        check_not_loaded_by_transformers()
        check_adapter_name(model, adapter_name, OPERATION_OF_ROLE)
        config = self.peft_config[adapter_name]
        if any(p.mask_strategy != "random" for p in config.parts):
            # The counts recorded below (and by calibrate_masks) belong to this model and adapter: record them in the
            # adapter's own copy, so that a config object reused for another model or adapter is planned afresh.
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
            # PEFT's token-classification and QA models add their heads to the config they were given only after
            # this injection: give the copy those heads now (as for SEQ_CLS, which adds them before)
            heads = TASK_HEADS.get(config.task_type, ())
            if heads:
                config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
        for part in config.parts:
            if is_data_driven(part.mask_strategy) and part.mask_counts is None:
                warnings.warn(f"APET part '{part.operation}' uses mask_strategy={part.mask_strategy!r}: its masks are "
                              "random placeholders until `peft_apet.calibrate_masks(model, batches)` chooses them.",
                              stacklevel=3)
        try:
            self.injecting = adapter_name
            super().inject_adapter(model, adapter_name, **kwargs)  # plans in `_prepare_model`, then builds layers
            record_mask_counts(config, self.building_plan)
            guard_cpu_repacking(model)
        finally:
            self.building_plan = self.prompt_ids = self.injecting = None
        self._warn_unlearnable(adapter_name)

    def replace_masks(self, adapter_name: str, chosen: list[tuple[str, TensorPlan]]) -> None:
        """Give tensors of `adapter_name` the masks a strategy chose: `(module name, tensor with its index)` each
        (`APETLayer.replace_mask`; the values restart from their initial values)."""
        init_weights = self.peft_config[adapter_name].init_weights
        for name, tensor in chosen:
            layer = self.model.get_submodule(name)
            if not isinstance(layer, APETLayer):
                raise ValueError(f"{name} is not an APET layer; was the adapter injected?")
            layer.replace_mask(adapter_name, tensor, init_weights)

    def _prepare_model(self, peft_config: APETConfig, model: nn.Module) -> None:
        # Runs before PEFT matches or replaces any module: every target, budget and checkpoint error surfaces here.
        folder = adapter_folder_being_loaded()
        if folder is None and any(data_free_score_fn(p.mask_strategy) is not None for p in peft_config.parts):
            check_nothing_merged(model, "adding an adapter whose masks a data-free mask_strategy chooses")
        plan = plan_adapter(model, peft_config)
        check_token_rows_match_other_adapters(model, self.injecting, plan.tokens,
                                              [a for a in self.peft_config if a != self.injecting])
        check_checkpoint_fits_plan(folder, plan, model)
        # a loaded adapter's prompt rows come from its file: its tokenizer need not be at hand (as PEFT's prompts)
        self.prompt_ids = _prompt_token_ids(peft_config) if folder is None and not peft_config.inference_mode else None
        self.building_plan = plan

    def _check_target_module_exists(self, peft_config: APETConfig, key: str) -> bool:
        return key in self.building_plan.modules

    def _create_and_replace(self, peft_config: APETConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        plan = self.building_plan.modules.get(current_key)
        if plan is None:
            raise ValueError(f"module {current_key} is not part of the APET adapter '{adapter_name}' planned for "
                             "this model (does the checkpoint belong to another base model?).")
        kwargs = dict(init_weights=peft_config.init_weights, inference_mode=peft_config.inference_mode,
                      init_values=self._prompt_init_values(target, plan))
        if isinstance(target, APETLayer):
            target.update_layer(adapter_name, plan, **kwargs)
            return
        new_module = LAYER_CLASSES[plan.kind](target, adapter_name, plan, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # APET keys hold the adapter name before the role: `<module>.apet_weights.<adapter>.<role>.values`;
        # checkpoints store `<module>.apet_weights.<role>.values`, whatever the adapter is called.
        if is_packed_key(key):  # `peft_apet.packing`: one key per role, no adapter name
            return key
        marker = f".apet_weights.{adapter_name}."
        head, found, tail = key.rpartition(marker)
        if found:
            return f"{head}.apet_weights.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: APETConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state_dict = check_state_fits_model(model, adapter_name, state_dict)  # unpacked; before anything is copied
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: APETConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]) -> dict:
        """As PEFT's, with the adapter's APET tensors packed (`peft_apet.packing`): every save path goes through here,
        including DeepSpeed ZeRO-3's consolidated state dict (raw int32 indices, collected module by module)."""
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if state_dict:  # an empty one is the Trainer's placeholder save under ZeRO-3 without gathered weights
            check_every_tensor_is_saved(model, adapter_name, entries)
        return pack_entries(entries, adapter_name, model.get_submodule)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # APET layers put their tensors on the base layer's device in `update_layer`; PEFT's generic version also
        # copies `weight`/`bias` onto modules without `base_layer`, which breaks unloading wrapped heads without a
        # weight (e.g. RoBERTa's classification head in modules_to_save).
        setattr(parent, child_name, new_module)

    def _prompt_init_values(self, target: nn.Module, plan: ModulePlan) -> dict | None:
        """Prompt rows from the embeddings of `prompt_init_text` (`_prompt_token_ids`), as PEFT does."""
        if "prompt" not in plan.tensors or self.prompt_ids is None:
            return None
        ids = self.prompt_ids
        embedding = target.get_base_layer() if isinstance(target, APETLayer) else target
        with torch.no_grad():
            rows = embedding(torch.tensor(ids, device=embedding.weight.device)).detach().float().cpu()
        return {"prompt": rows}

    # ------------------------------------------------------------------ merging
    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        check_quantized_mergeable(self.model)  # before any weight is dequantized and requantized

    def _check_parts_mergeable(self, adapter_names: list[str]) -> None:
        """Refuse, before anything changes, to merge an adapter with a part that cannot merge: a plug-in or a
        prompt anywhere, or a bias part on a layer that has no bias to merge into (e.g. an RMSNorm)."""
        for name in adapter_names:
            blocked = [p.operation for p in self.peft_config[name].parts if not p.mergeable]
            if blocked:
                raise ValueError(
                    f"cannot merge APET adapter '{name}': its parts {blocked} are not mergeable (an adapter plug-in "
                    "is non-linear and a prompt changes the input sequence). Only lora, bias and delta parts merge; "
                    "keep the adapter unmerged for inference instead. Nothing was changed."
                )
        owners: dict[tuple[str, int], list[str]] = {}  # a weight's storage -> the parameters that hold it
        for param_name, param in self.model.named_parameters(remove_duplicate=False):
            storage = storage_key(param)
            if storage is not None:
                owners.setdefault(storage, []).append(param_name)
        for key, module in self.model.named_modules():
            if not isinstance(module, APETLayer):
                continue
            merging = [module.apet_weights[n] for n in adapter_names if n in module.apet_weights]
            if any("bias" in weights for weights in merging):
                try:
                    module._bias_target(create=False)
                except ValueError as e:
                    raise ValueError(f"cannot merge into '{key}': {e} Nothing was changed.") from None
            weight = getattr(module.get_base_layer(), "weight", None)
            if weight is not None and any(OPERATION_OF_ROLE[role].merges_into == "weight"
                                          for weights in merging for role in weights):
                sharing = owners.get(storage_key(weight), [])
                if len(sharing) > 1:
                    raise ValueError(
                        f"cannot merge into '{key}': its weight is tied to {sharing} (one tensor), so merging would "
                        "change those modules too (e.g. the input embedding of a tied output layer). Untie it first "
                        "(e.g. `config.tie_word_embeddings=False` and a copy of the weight) or keep the adapter "
                        "unmerged. Nothing was changed.")

    def _check_merge_adds_no_parameter_under_zero3(self, adapter_names: list[str]) -> None:
        """Refuse, before anything changes, a merge that would give a ZeRO-3-partitioned layer a new parameter.

        Merging a bias part into a layer without a bias creates one; DeepSpeed ZeRO-3 manages only the parameters
        it partitioned at start, and its next forward fails on the new one."""
        for key, module in self.model.named_modules():
            if not isinstance(module, APETLayer):
                continue
            base = module.get_base_layer()
            if not hasattr(getattr(base, "weight", None), "ds_id") or getattr(base, "bias", None) is not None:
                continue
            if any(name in module.apet_weights and "bias" in module.apet_weights[name] for name in adapter_names):
                raise ValueError(
                    f"cannot merge the APET bias of '{key}' under DeepSpeed ZeRO-3: the base layer has no bias, and "
                    "merging would add a parameter ZeRO-3 does not partition. Save the adapter and merge it into an "
                    "unpartitioned model (PeftModel.from_pretrained(base, folder).merge_and_unload())."
                )

    def _check_before_merge(self, adapter_names: list[str], safe_merge: bool) -> None:
        """Whole-model checks of a merge, before any layer changes."""
        self._check_parts_mergeable([name for name in adapter_names if name in self.peft_config])
        self._check_merge_adds_no_parameter_under_zero3(adapter_names)
        if safe_merge:  # check every layer first: a NaN in the last layer must not leave the first ones merged
            check_merge_is_finite(self.model, adapter_names)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_before_merge(adapter_names or self.active_adapters, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self._check_before_merge(adapter_names or self.active_adapters, safe_merge)
        # without merge, `unload` keeps what `merge_adapter` merged before: the biases it created (no adapter names)
        new_biases = modules_gaining_a_bias(self.model, (adapter_names or self.active_adapters) if merge else [])
        model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                     adapter_names=adapter_names)
        if new_biases:
            warn_new_biases(model, new_biases)
        return model

    # ------------------------------------------------------------------ prompts
    def _active_prompt(self) -> tuple[PromptEmbedding | None, str | None]:
        for module in self.model.modules():
            if isinstance(module, PromptEmbedding):
                name = module.active_prompt()
                if name is not None:
                    return module, name
        return None, None

    def _with_prompt(self, args: tuple, kwargs: dict, for_generate: bool) -> tuple[dict, int, bool]:
        embedding, name = self._active_prompt()
        if name is None:
            return None, 0, False
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise ValueError("with an APET prompt, pass model inputs as keyword arguments (input_ids=...).")
            kwargs = {"input_ids": args[0], **kwargs}
        task_type = self.peft_config[name].task_type
        kwargs = prepend_prompt(kwargs, embedding, name, pad_labels=(task_type == "CAUSAL_LM" and not for_generate))
        strip = for_generate and kwargs.get("input_ids") is not None and not getattr(
            self.model.config, "is_encoder_decoder", False)
        return kwargs, embedding.prompt_table(name).shape[0], strip

    def train(self, mode: bool = True) -> APETModel:
        """`nn.Module.train`; entering training mode also returns 4-bit weights that bitsandbytes repacked for its
        CPU inference kernel during an evaluation to the storage its training path needs
        (`quantized.unpack_cpu_repacked_4bit_`): without this, gradients stop flowing through them (the Trainer
        calls `train()` before every step). A state dict taken in between (a checkpoint after an evaluation) unpacks
        them the same way first (`quantized.guard_cpu_repacking`)."""
        super().train(mode)
        if mode:
            unpack_cpu_repacked_4bit_(self.model)
        return self

    def forward(self, *args: Any, **kwargs: Any):
        prompted, _, _ = self._with_prompt(args, kwargs, for_generate=False)
        if prompted is None:
            return self.model(*args, **kwargs)
        return self.model(**prompted)

    def generate(self, *args: Any, **kwargs: Any):
        """`generate` of the base model, with the active prompt prepended once and stripped from the output."""
        prompted, n, strip = self._with_prompt(args, kwargs, for_generate=True)
        if prompted is None:
            return self.model.generate(*args, **kwargs)
        if not strip:
            return self.model.generate(**self._encoder_penalty_on_real_tokens(prompted, n))
        with custom_callbacks_on_real_tokens(self.model, n):
            output = self.model.generate(**real_tokens_only(prompted, n, self.model.generation_config))
        if isinstance(output, torch.Tensor):
            return output[:, n:]
        output.sequences = output.sequences[:, n:]
        return output

    def _encoder_penalty_on_real_tokens(self, kwargs: dict, n: int) -> dict:
        """`encoder_repetition_penalty` reads the encoder's input ids, which hold the virtual prompt ids (outside the
        vocabulary, where transformers' processor would index out of range): apply it to the real tokens only."""
        config = kwargs.get("generation_config") or self.model.generation_config
        penalty = kwargs.get("encoder_repetition_penalty", getattr(config, "encoder_repetition_penalty", None))
        input_ids = kwargs.get("input_ids")
        if penalty in (None, 1.0) or input_ids is None or not getattr(self.model.config, "is_encoder_decoder", False):
            return kwargs
        from transformers.generation.logits_process import EncoderRepetitionPenaltyLogitsProcessor, LogitsProcessorList

        processors = LogitsProcessorList(kwargs.get("logits_processor") or [])
        processors.append(EncoderRepetitionPenaltyLogitsProcessor(penalty=penalty, encoder_input_ids=input_ids[:, n:]))
        return {**kwargs, "encoder_repetition_penalty": 1.0, "logits_processor": processors}

    # ------------------------------------------------------------------ inspection
    def adapter_summary(self, adapter_name: str | None = None) -> str:
        """A table of every APET tensor of an adapter: module, role, shape, mask, entries that can learn (receive a
        gradient: see `APETLayer.learnable_entries`) and trainable entries; token rows last.

        Args:
            adapter_name: the adapter to describe (default: the first active one).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        rows, learnable = [], []
        for module_name, module in self._apet_layers(adapter_name):
            can_learn = module.learnable_entries(adapter_name)
            for role, weight in module.apet_weights[adapter_name].items():
                rows.append((module_name, role, weight.shape, weight.mask, weight.num_entries))
                learnable.append(can_learn[role])
        for module_name, layer in token_layers(self.model, adapter_name):
            delta = layer.trainable_tokens_delta[adapter_name]
            rows.append((module_name, TOKENS_ROLE, tuple(delta.shape), None, delta.numel()))
            learnable.append(delta.numel())
        return summary_table(rows, learnable)

    def learnable_entries(self, adapter_name: str | None = None) -> tuple[int, int]:
        """`(learnable, trainable)`: the adapter's trainable entries, and how many of them can receive a gradient
        (in a two-matrix path, an entry whose rank unit has no trainable entry in the other matrix cannot).

        Args:
            adapter_name: the adapter to count (default: the first active one).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        learnable = trainable = 0
        for _, module in self._apet_layers(adapter_name):
            learnable += sum(module.learnable_entries(adapter_name).values())
            trainable += sum(w.num_entries for w in module.apet_weights[adapter_name].values())
        return learnable, trainable

    def _apet_layers(self, adapter_name: str) -> list[tuple[str, APETLayer]]:
        return [(module_name, module) for module_name, module in self.model.named_modules()
                if isinstance(module, APETLayer) and adapter_name in module.apet_weights]

    def _warn_unlearnable(self, adapter_name: str) -> None:
        learnable, trainable = self.learnable_entries(adapter_name)
        if trainable and trainable - learnable > 0.01 * trainable:
            warnings.warn(
                f"APET adapter '{adapter_name}': {trainable - learnable} of its {trainable} trainable entries "
                f"({(trainable - learnable) / trainable:.1%}) can never receive a gradient (in a lora/adapter part, "
                "their rank unit has no trainable entry in the other matrix). mask_pairing='aligned' (the default) "
                "draws the two matrices' masks on shared units; see `adapter_summary()`.",
                stacklevel=3,
            )
