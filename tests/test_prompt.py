"""Generation with an APET prompt under logits processors that read the input ids (which hold virtual ids)."""

from __future__ import annotations

import pytest
import torch
from conftest import model_inputs, tiny_gpt2, tiny_llama, tiny_t5
from peft import PromptTuningConfig, get_peft_model

from peft_apet import APETConfig

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}


def first_step_scores(model, inputs: dict, **kwargs) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.scores[0]


def penalised(scores: torch.Tensor, token_ids: torch.Tensor, factor: float) -> torch.Tensor:
    """transformers' repetition-penalty formula, written out: tokens seen get score * factor if negative, else
    score / factor; every other score is unchanged."""
    expected = scores.clone()
    for row, ids in enumerate(token_ids):
        for token in set(ids.tolist()):
            s = scores[row, token]
            expected[row, token] = s * factor if s < 0 else s / factor
    return expected


def prompted(name: str):
    task_type = "SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM"
    model = get_peft_model(BUILDERS[name](), APETConfig.prompt(num_virtual_tokens=4, task_type=task_type))
    torch.nn.init.normal_(next(p for n, p in model.named_parameters() if p.requires_grad), std=1.0)
    inputs = model_inputs(name, batch=2, length=5, seed=0)
    for key in ("labels", "decoder_input_ids", "decoder_attention_mask"):
        inputs.pop(key, None)  # T5 starts its answer from the decoder start token
    return model.eval(), inputs


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_repetition_penalty_sees_the_real_tokens_only(name):
    model, inputs = prompted(name)
    plain = first_step_scores(model, inputs)
    with_penalty = first_step_scores(model, inputs, repetition_penalty=1.5)
    # Decoders penalise the tokens of their input; T5 those of the decoder's input (the start token).
    seen = inputs["input_ids"] if name != "t5" else torch.zeros(2, 1, dtype=torch.long)
    torch.testing.assert_close(with_penalty, penalised(plain, seen, 1.5))


def test_encoder_repetition_penalty_applies_to_the_real_encoder_tokens():
    model, inputs = prompted("t5")
    plain = first_step_scores(model, inputs)
    with_penalty = first_step_scores(model, inputs, encoder_repetition_penalty=2.0)
    # The encoder penalty favours the encoder's tokens: transformers uses the factor 1 / penalty.
    torch.testing.assert_close(with_penalty, penalised(plain, inputs["input_ids"], 1 / 2.0))
    sequences = model.generate(**inputs, max_new_tokens=3, num_beams=2, encoder_repetition_penalty=2.0)
    assert sequences.shape == (2, 4)


def repeated_bigrams(row: list[int], eos: int = 1) -> int:
    """Bigrams that occur again in `row` up to its first EOS (after it comes padding)."""
    row = row[:row.index(eos) + 1] if eos in row else row
    bigrams = list(zip(row, row[1:]))
    return len(bigrams) - len(set(bigrams))


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_no_repeat_ngram_blocks_repeats_among_the_real_tokens(name):
    """The sequences hold real tokens only (prompt stripped), and no bigram of them repeats; without the processor
    the same greedy generation does repeat one, so the check sees the processor work."""
    model, inputs = prompted(name)
    kwargs = dict(max_new_tokens=16, do_sample=False)
    free = model.generate(**inputs, **kwargs)
    out = model.generate(**inputs, no_repeat_ngram_size=2, **kwargs)
    length = 1 + 16 if name == "t5" else 5 + 16  # T5: start token; decoders: the real input (prompt stripped)
    assert out.shape == (2, length) and int(out.max()) < model.get_input_embeddings().num_embeddings
    if name != "t5":
        assert torch.equal(out[:, :5], inputs["input_ids"])
    assert sum(repeated_bigrams(row) for row in free.tolist()) > 0
    assert all(repeated_bigrams(row) == 0 for row in out.tolist())


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_sequence_bias_moves_exactly_the_biased_token(name):
    model, inputs = prompted(name)
    plain = first_step_scores(model, inputs)
    token = int(plain[0].argmax())
    biased = first_step_scores(model, inputs, sequence_bias={(token,): -1.0})
    expected = plain.clone()
    expected[:, token] -= 1.0
    torch.testing.assert_close(biased, expected)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("lengths", [{"max_length": 12}, {"max_new_tokens": 6, "min_length": 11, "eos_token_id": None},
                                     {}])
def test_length_limits_count_the_real_tokens_as_peft_prompt_tuning_does(name, lengths):
    """A decoder's ids carry the virtual tokens: max_length / min_length (given or the config's default) would count
    them and stop n tokens early. The outputs equal PEFT's prompt tuning with the same table."""
    model, inputs = prompted(name)
    reference = get_peft_model(BUILDERS[name](), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    table = next(p for p in model.parameters() if p.requires_grad).detach()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(table.view(4, -1))
    # PEFT without its cache (with it, its prompt tuning departs from its own uncached run on these models)
    expected = reference.eval().generate(**inputs, do_sample=False, use_cache=False, **lengths)
    torch.testing.assert_close(model.generate(**inputs, do_sample=False, **lengths), expected, rtol=0, atol=0)


def test_generation_callbacks_see_the_real_tokens_only():
    from transformers import LogitsProcessor, StoppingCriteria

    model, inputs = prompted("llama")
    seen: dict[str, list] = {"streamer": [], "prefix": [], "processor": [], "criterion": []}

    class Streamer:
        def put(self, value):
            seen["streamer"].append(value.clone())

        def end(self):
            pass

    class Processor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen["processor"].append(input_ids.clone())
            return scores

    class Criterion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen["criterion"].append(input_ids.clone())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def allowed(batch_id, ids):
        seen["prefix"].append(ids.clone())
        return list(range(model.get_base_model().config.vocab_size))

    single = {k: v[:1] for k, v in inputs.items()}  # streamers take one sequence
    out = model.generate(**single, max_new_tokens=2, do_sample=False, streamer=Streamer(),
                         prefix_allowed_tokens_fn=allowed, logits_processor=[Processor()],
                         stopping_criteria=[Criterion()])
    real = single["input_ids"]
    assert torch.equal(seen["streamer"][0].view(1, -1), real)
    assert torch.equal(seen["prefix"][0], real[0])
    assert torch.equal(seen["processor"][0], real) and torch.equal(seen["criterion"][-1], out)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_min_length_holds_off_eos_for_the_real_tokens(name):
    model, inputs = prompted(name)
    length = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_length=length + 6, output_scores=True,
                         return_dict_in_generate=True)
    eos = model.get_base_model().generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    assert len(out.scores) == 6 and all(bool(torch.isinf(step[:, eos]).all()) for step in out.scores)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_custom_processor_replaces_the_built_one_as_for_peft(name):
    """transformers lets a user's processor replace the one it builds of the same type: still so with a prompt."""
    from transformers import RepetitionPenaltyLogitsProcessor

    model, inputs = prompted(name)
    reference = get_peft_model(BUILDERS[name](), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    table = next(p for p in model.parameters() if p.requires_grad).detach()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(table.view(4, -1))
    custom = {"repetition_penalty": 1.2, "logits_processor": [RepetitionPenaltyLogitsProcessor(3.0)]}
    expected = first_step_scores(reference.eval(), inputs, use_cache=False, **custom)
    torch.testing.assert_close(first_step_scores(model, inputs, **custom), expected)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_models_own_max_length_counts_the_real_tokens_under_a_given_generation_config(name):
    from transformers import GenerationConfig

    model, inputs = prompted(name)
    model.get_base_model().generation_config.max_length = 13  # as many Hub models ship one
    out = model.generate(**inputs, generation_config=GenerationConfig(do_sample=False))
    assert out.shape[1] == 13
