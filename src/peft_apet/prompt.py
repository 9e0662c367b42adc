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


class _RealTokensProcessor:
    """A user's logits processor given the ids after the `n` virtual prompt tokens: the sequence it would see
    without a prompt. (`(input_ids, scores)` only: transformers reads the signature.)"""

    def __init__(self, inner: Any, n: int):
        self.inner, self.n = inner, n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids[:, self.n:], scores)


class _RealTokensCriterion(_RealTokensProcessor):
    """A user's stopping criterion given the real ids, as `_RealTokensProcessor`."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.inner(input_ids[:, self.n:], scores, **kwargs)


class _RealTokensStreamer:
    """A streamer whose first `put` (the prompt) gets the real ids only."""

    def __init__(self, inner: Any, n: int):
        self.inner, self.n, self.first = inner, n, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:
            self.first = False
            value = value[..., self.n:]
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def real_tokens_only(kwargs: dict[str, Any], n: int, default_config: Any) -> dict[str, Any]:
    """`generate` kwargs of a decoder-only model whose `input_ids` start with `n` virtual prompt tokens, adjusted so
    that generation behaves as PEFT's prompt tuning does, where the prompt is not part of the ids: `max_length` and
    `min_length` (given, or from the generation config, when no `*_new_tokens` replaces them) count real tokens
    only, and the user's streamer, `prefix_allowed_tokens_fn`, logits processors and stopping criteria see the real
    ids. `default_config`: the model's generation config, used where no `generation_config` is given."""
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    kwargs = dict(kwargs)
    config = kwargs.get("generation_config") or default_config
    for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = kwargs.get(length, getattr(config, length, None))
        if kwargs.get(new_tokens, getattr(config, new_tokens, None)) is None and value:
            kwargs[length] = value + n
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _RealTokensStreamer(kwargs["streamer"], n)
    allowed = kwargs.get("prefix_allowed_tokens_fn")
    if allowed is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, ids: allowed(batch_id, ids[n:])
    if kwargs.get("logits_processor"):
        kwargs["logits_processor"] = LogitsProcessorList(_RealTokensProcessor(p, n)
                                                        for p in kwargs["logits_processor"])
    if kwargs.get("stopping_criteria"):
        kwargs["stopping_criteria"] = StoppingCriteriaList(_RealTokensCriterion(c, n)
                                                          for c in kwargs["stopping_criteria"])
    return kwargs
