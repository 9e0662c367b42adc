"""Prepending soft-prompt tokens to a model's inputs (the Concatenate operation on the input sequence).

Virtual tokens enter at the `input_ids` level, as ids `vocab_size .. vocab_size + n - 1`, so that the model
derives its attention mask, positions and padding logic from the extended sequence exactly as it would for
real tokens; `PromptEmbedding` maps those ids to the prompt table. With `inputs_embeds` the prompt rows are
concatenated directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
    `min_length` (given, from the `generation_config` given, else from the model's, when no `*_new_tokens`
    replaces them) count real tokens only, and the user's streamer and `prefix_allowed_tokens_fn` see the real ids
    (logits processors and stopping criteria: `custom_callbacks_on_real_tokens`). `default_config`: the model's
    generation config, which transformers uses for every field the given one leaves unset."""
    kwargs = dict(kwargs)
    given = kwargs.get("generation_config")

    def effective(name: str) -> Any:
        for source in (kwargs, vars(given) if given is not None else {}, vars(default_config)):
            if source.get(name) is not None:
                return source[name]
        return None

    for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = effective(length)
        if effective(new_tokens) is None and value:
            kwargs[length] = value + n
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _RealTokensStreamer(kwargs["streamer"], n)
    allowed = kwargs.get("prefix_allowed_tokens_fn")
    if allowed is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, ids: allowed(batch_id, ids[n:])
    return kwargs


@contextmanager
def custom_callbacks_on_real_tokens(model: Any, n: int) -> Iterator[None]:
    """While `model.generate` runs: the user's logits processors and stopping criteria get the ids after the `n`
    virtual prompt tokens. They are wrapped after transformers merges them with the ones it builds, so that a
    user's processor still replaces a built one of its type (transformers compares types)."""
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    original = model._merge_criteria_processor_list

    def merge(default_list: Any, custom_list: Any) -> Any:
        merged = original(default_list, custom_list)
        custom = {id(c) for c in custom_list or ()}
        wrap = _RealTokensCriterion if isinstance(merged, StoppingCriteriaList) else _RealTokensProcessor
        return type(merged)(wrap(p, n) if id(p) in custom else p for p in merged)

    model._merge_criteria_processor_list = merge
    try:
        yield
    finally:
        del model._merge_criteria_processor_list
