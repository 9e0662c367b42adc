"""Adapter, BitFit and masked deltas against references written out here; the paper's parameter counts by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, model_inputs, model_output
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

from peft_apet import APETConfig, APETLayer, count_trainable_parameters
from peft_apet.modules import is_conv1d

ADAPTER_PLACES = {  # module-name suffixes that get a Houlsby adapter, per model type
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "t5": ("SelfAttention.o", "DenseReluDense.wo"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
}


def apet_layers(model, role: str) -> dict[str, APETLayer]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules()
            if isinstance(m, APETLayer) and "default" in m.apet_weights and role in m.apet_weights["default"]}


def _copy_trained_head(model, reference) -> None:
    """Give the reference the (modules_to_save) classification head the APET model trains."""
    for head_name in ("classifier", "score"):
        wrapper = getattr(model.base_model.model, head_name, None)
        if wrapper is not None:
            getattr(reference, head_name).load_state_dict(wrapper.modules_to_save["default"].state_dict())


def test_adapter_placement_and_formula(model_name):
    factory, task_type = MODELS[model_name]
    model = get_peft_model(factory(), APETConfig.adapter(bottleneck=5, activation="gelu", task_type=task_type,
                                                         init_weights=False))
    layers = apet_layers(model, "adapter_down")
    blocks = {n for n, _ in factory().named_modules() if n.endswith(ADAPTER_PLACES[model_name])}
    assert set(layers) == blocks and len(blocks) == 2 * 2 * (2 if model_name == "t5" else 1)
    # f(h) + σ(f(h) W_down^T) W_up^T, written out on one wrapped module
    name, layer = next(iter(layers.items()))
    weights = layer.apet_weights["default"]
    h = torch.randn(3, layer.get_base_layer().weight.shape[1 if not is_conv1d(layer.get_base_layer()) else 0])
    with torch.no_grad():
        f = layer.get_base_layer()(h)
        expected = f + F.gelu(f @ weights["adapter_down"].dense().T) @ weights["adapter_up"].dense().T
        torch.testing.assert_close(layer(h), expected)
    with model.disable_adapter():
        torch.testing.assert_close(layer(h), f)


@pytest.mark.parametrize("model_name", ["bert", "roberta", "gpt2"])
def test_bitfit_trains_exactly_the_models_biases(model_name):
    factory, task_type = MODELS[model_name]
    base = factory()
    heads = ("classifier", "score")
    biases = {n.removesuffix(".bias"): p.numel() for n, p in base.named_parameters()
              if n.endswith(".bias") and not n.startswith(heads)}
    model = get_peft_model(factory(), APETConfig.bitfit(task_type=task_type))
    layers = apet_layers(model, "bias")
    assert set(layers) == set(biases)
    assert count_trainable_parameters(factory(), APETConfig.bitfit(task_type=task_type)) == sum(biases.values())

    # After training, the model equals the base model with the learned deltas added to its own biases.
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**model_inputs(model_name, labels=True, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    reference = copy.deepcopy(base)
    reference_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            reference_modules[name].bias += layer.apet_weights["default"]["bias"].dense()
    _copy_trained_head(model, reference)
    inputs = model_inputs(model_name)
    torch.testing.assert_close(model_output(model, inputs), model_output(reference, inputs), rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # the original biases (and head) again
        torch.testing.assert_close(model_output(model, inputs), model_output(factory(), inputs), rtol=0, atol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(model_output(merged, inputs), model_output(reference, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["t5", "llama"])
def test_bitfit_on_bias_free_models_adds_new_biases(model_name):
    factory, task_type = MODELS[model_name]
    assert not any(n.endswith(".bias") for n, _ in factory().named_parameters())
    model = get_peft_model(factory(), APETConfig.bitfit(task_type=task_type, init_weights=False))
    layers = apet_layers(model, "bias")
    assert layers and all(type(m.get_base_layer()).__name__ == "Linear" for m in layers.values())
    inputs = model_inputs(model_name)
    adapted = model_output(model, inputs)
    model.merge_adapter()
    for layer in layers.values():  # merge creates base biases equal to the learned vectors
        assert torch.equal(layer.get_base_layer().bias, layer.apet_weights["default"]["bias"].dense().detach())
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert all(layer.get_base_layer().bias is None for layer in layers.values())


@pytest.mark.parametrize("mask", ["adjacent", "discrete"])
def test_masked_delta_equals_base_model_with_entries_added(model_name, mask):
    factory, task_type = MODELS[model_name]
    model = get_peft_model(factory(), APETConfig.delta(mask=mask, num_trainable_params=211, task_type=task_type,
                                                       init_weights=False))
    reference = factory()
    reference_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in apet_layers(model, "delta").items():
            delta = layer.apet_weights["default"]["delta"]
            weight = reference_modules[name].weight
            dense = torch.zeros(delta.shape).view(-1).index_put_((delta.flat_indices(),), delta.values)
            weight += dense.view(delta.shape).T if is_conv1d(reference_modules[name]) else dense.view(delta.shape)
    _copy_trained_head(model, reference)
    inputs = model_inputs(model_name)
    torch.testing.assert_close(model_output(model, inputs), model_output(reference, inputs), rtol=1e-5, atol=1e-6)


def _paper_counts(model) -> dict[str, int]:
    is_t5 = model.config.model_type == "t5"
    task_type = "SEQ_2_SEQ_LM" if is_t5 else "SEQ_CLS"
    return {
        "prompt": count_trainable_parameters(model, APETConfig.prompt(num_virtual_tokens=100, task_type=task_type)),
        "bitfit": count_trainable_parameters(model, APETConfig.bitfit(task_type=task_type)),
        "lora": count_trainable_parameters(model, APETConfig.lora(r=8, lora_alpha=16, task_type=task_type)),
        "adapter": count_trainable_parameters(model, APETConfig.adapter(bottleneck=24, task_type=task_type)),
    }


def test_paper_parameter_counts_bert_base():
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig())  # BERT-base: 12 layers, d=768, FFN 3072
    d, ffn, layers = 768, 3072, 12
    per_layer_biases = 4 * d + d + ffn + d + d  # q, k, v, attention output, its LayerNorm, FFN in, out, LayerNorm
    assert _paper_counts(model) == {
        "prompt": 100 * d,
        "bitfit": layers * per_layer_biases + d + d,  # + embedding LayerNorm and pooler
        "lora": layers * 2 * 8 * (d + d),  # query and value
        "adapter": layers * 2 * (24 * d + d * 24),  # after attention output and FFN output
    }


def test_paper_parameter_counts_t5_base():
    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12))  # T5-base
    d, ffn, layers = 768, 3072, 12
    encoder_attention, decoder_attention = layers, 2 * layers  # decoder: self- and cross-attention
    assert _paper_counts(model) == {
        "prompt": 100 * d,  # on the encoder input
        "bitfit": (encoder_attention + decoder_attention) * 4 * d + 2 * layers * (ffn + d),  # new biases
        "lora": (encoder_attention + decoder_attention) * 2 * 8 * (d + d),  # q and v
        "adapter": 2 * layers * 2 * (24 * d + d * 24),  # after self-attention output and FFN output
    }


def _tiny_tokenizer(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "classify": 7, "the": 8, "review": 9, "sentiment": 10}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return str(path)


def test_prompt_initialised_from_text_embeddings(tmp_path):
    factory, task_type = MODELS["llama"]
    config = APETConfig.prompt(num_virtual_tokens=6, prompt_init="text", prompt_init_text="classify the review",
                               tokenizer_name_or_path=_tiny_tokenizer(tmp_path / "tok"), task_type=task_type)
    model = get_peft_model(factory(), config)
    layer = next(iter(apet_layers(model, "prompt").values()))
    table = layer.apet_weights["default"]["prompt"].dense().detach()
    words = factory().get_input_embeddings().weight.detach()
    torch.testing.assert_close(table, words[[7, 8, 9, 7, 8, 9]])  # the text's tokens, repeated to length (PEFT)


def test_a_saved_text_initialised_prompt_loads_without_its_tokenizer(tmp_path):
    """The rows are in the file: loading reads no tokenizer (as PEFT's prompt tuning), e.g. on another machine."""
    import shutil

    from peft import PeftModel

    factory, task_type = MODELS["llama"]
    config = APETConfig.prompt(num_virtual_tokens=6, prompt_init="text", prompt_init_text="classify the review",
                               tokenizer_name_or_path=_tiny_tokenizer(tmp_path / "tok"), task_type=task_type)
    model = get_peft_model(factory(), config)
    inputs = model_inputs("llama")
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "tok")
    torch.testing.assert_close(model_output(PeftModel.from_pretrained(factory(), tmp_path / "adapter"), inputs),
                               expected, rtol=0, atol=0)


def test_a_prompt_tokenizer_that_cannot_load_is_a_value_error_before_any_change(tmp_path):
    factory, task_type = MODELS["llama"]
    config = APETConfig.prompt(num_virtual_tokens=6, prompt_init="text", prompt_init_text="classify the review",
                               tokenizer_name_or_path=str(tmp_path / "no-such-tokenizer"), task_type=task_type)
    base = factory()
    modules = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=r"`tokenizer_name_or_path`=.*no-such-tokenizer.*cannot be loaded.*Nothing"):
        get_peft_model(base, config)
    assert [(n, type(m)) for n, m in base.named_modules()] == modules


def test_combined_mergeable_parts_merge_and_unload(model_name):
    factory, task_type = MODELS[model_name]
    config = APETConfig.combine(APETConfig.lora(mask="discrete"), APETConfig.bitfit(mask="adjacent"),
                                APETConfig.delta(mask="discrete"), num_trainable_params=1234, task_type=task_type,
                                init_weights=False)
    model = get_peft_model(factory(), config)
    assert model.get_nb_trainable_parameters()[0] - _head_size(model) == 1234
    inputs = model_inputs(model_name)
    adapted = model_output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, APETLayer) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, inputs), adapted, rtol=1e-5, atol=1e-5)


def _head_size(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
