"""Default targets of every operation on MPNet (all-mpnet-base-v2's architecture), the second real encoder."""

from __future__ import annotations

import pytest
import torch
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
