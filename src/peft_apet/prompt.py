"""Prepending soft-prompt tokens to a model's inputs (the Concatenate operation on the input sequence).

Virtual tokens enter at the `input_ids` level, as ids `vocab_size .. vocab_size + n - 1`, so that the model
derives its attention mask, positions and padding logic from the extended sequence exactly as it would for
real tokens; `PromptEmbedding` maps those ids to the prompt table. With `inputs_embeds` the prompt rows are
concatenated directly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .layer import PromptEmbedding


def prepend_prompt(kwargs: dict[str, Any], embedding: PromptEmbedding, adapter_name: str,
                   pad_labels: bool) -> dict[str, Any]:
    """Return new model kwargs with `n` virtual tokens in front of the (encoder) input.

    Extends `attention_mask` with ones and `token_type_ids` with zeros; for causal LMs (`pad_labels`) extends
    `labels` with -100 so the virtual positions carry no loss. `position_ids` are dropped (with a warning), as
    PEFT's prompt tuning does, so the model numbers the extended sequence itself.
    """
    kwargs = dict(kwargs)
    prompt = embedding.prompt_table(adapter_name)
    n = prompt.shape[0]
    input_ids, inputs_embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if input_ids is not None:
        batch, device = input_ids.shape[0], input_ids.device
        virtual = torch.arange(n, device=device) + embedding.num_embeddings
        kwargs["input_ids"] = torch.cat([virtual.expand(batch, n), input_ids], dim=1)
    elif inputs_embeds is not None:
        batch, device = inputs_embeds.shape[0], inputs_embeds.device
        rows = prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([rows, inputs_embeds], dim=1)
    else:
        raise ValueError("an APET prompt needs `input_ids` or `inputs_embeds` in the model inputs.")
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
    if kwargs.get("position_ids") is not None:
        warnings.warn("position_ids are not supported with an APET prompt and are ignored (as in PEFT).", stacklevel=2)
        kwargs["position_ids"] = None
    if pad_labels and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return kwargs
