"""Default targets of every operation on MPNet (all-mpnet-base-v2's architecture), the second real encoder."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, model_inputs
from peft import get_peft_model
from transformers import MPNetConfig, MPNetForSequenceClassification

from peft_apet import APETConfig, APETLayer
from peft_apet.targets import default_target_modules


def tiny_mpnet() -> MPNetForSequenceClassification:
    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, num_labels=2)).eval()


# module-name suffixes of one MPNet layer each operation should wrap
EXPECTED = {
    "lora": {"attention.attn.q", "attention.attn.v"},
    "adapter": {"attention.attn.o", "output.dense"},
    "delta": {"attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "intermediate.dense",
              "output.dense"},
}
PRESETS = {"lora": lambda: APETConfig.lora(r=2, task_type="SEQ_CLS"),
           "adapter": lambda: APETConfig.adapter(bottleneck=4, task_type="SEQ_CLS"),
           "delta": lambda: APETConfig.delta(mask="discrete", num_trainable_params=300, task_type="SEQ_CLS")}


@pytest.mark.parametrize("operation", sorted(EXPECTED))
def test_mpnet_default_targets_wrap_the_expected_modules(operation):
    model = get_peft_model(tiny_mpnet(), PRESETS[operation]())
    wrapped = {name.split("layer.0.", 1)[1] for name, module in model.named_modules()
               if isinstance(module, APETLayer) and ".layer.0." in name}
    assert wrapped == EXPECTED[operation]
    assert not any(isinstance(m, APETLayer) for n, m in model.named_modules() if "classifier" in n)


def test_mpnet_delta_trains_its_budget_and_changes_the_output():
    base = tiny_mpnet()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = get_peft_model(base, APETConfig.delta(mask="discrete", num_trainable_params=300, task_type="SEQ_CLS"))
    apet = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    assert apet == 300
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # a fresh delta is zero
        for name, p in model.named_parameters():
            if p.requires_grad and "classifier" not in name:
                p.add_(0.1)
        assert not torch.allclose(model(input_ids=ids).logits, before)


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(ValueError, match="mpnet"):
        default_target_modules("no-such-model", "lora")


@pytest.mark.parametrize("task_type,head", [("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")])
@pytest.mark.parametrize("make", [lambda t: APETConfig.bitfit(task_type=t),
                                  lambda t: APETConfig.lora(target_modules="all-linear", task_type=t),
                                  lambda t: APETConfig.delta(num_trainable_params=200, mask_strategy="magnitude",
                                                             task_type=t, modules_to_save=["pooler"])])
def test_task_heads_peft_trains_in_full_are_never_targets(task_type, head, make):
    """PEFT's token-classification and QA models add their head to `modules_to_save`, as for SEQ_CLS: a part on it
    crashed ("modules_to_save cannot be applied to modules of type peft_apet.layer.Linear")."""
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=64)
    base = (BertForTokenClassification if task_type == "TOKEN_CLS" else BertForQuestionAnswering)(config)
    model = get_peft_model(base, make(task_type))
    assert not [n for n, m in model.named_modules() if isinstance(m, APETLayer) and head in n]
    trained = {n for n, p in model.named_parameters() if p.requires_grad and head in n}
    assert trained == {f"base_model.model.{head}.modules_to_save.default.{p}" for p in ("weight", "bias")}
    model.train()(**model_inputs("bert"))
    assert head in model.peft_config["default"].modules_to_save  # what the saved config records


def test_a_prompt_on_a_t5_encoder_alone_equals_peft_prompt_tuning():
    """T5EncoderModel's `encoder.embed_tokens` is its own module tied to `shared`: the prompt goes there."""
    from peft import PromptTuningConfig
    from transformers import T5Config, T5EncoderModel

    def encoder():
        torch.manual_seed(0)
        return T5EncoderModel(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                       vocab_size=VOCAB)).eval()

    reference = get_peft_model(encoder(), PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4))
    model = get_peft_model(encoder(), APETConfig.prompt(num_virtual_tokens=4, task_type="FEATURE_EXTRACTION"))
    table = reference.prompt_encoder["default"].embedding.weight[:4].detach()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).copy_(table.flatten())
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state,
                                   rtol=0, atol=1e-6)
