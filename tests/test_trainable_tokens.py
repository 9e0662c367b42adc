"""Trainable token rows (`APETConfig.trainable_token_indices`): counted in the exact budget, trained alone, saved
compactly, reloaded, merged into the embedding, tied embeddings handled as PEFT does, bad input refused early."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODELS, model_inputs, model_output, tiny_bert, tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_apet import APETConfig, count_trainable_parameters

IDS = [3, 17, 40]
DIM = 32  # hidden size of the tiny models
HEADS = {"bert": 66, "roberta": 32 * 32 + 32 + 32 * 2 + 2}  # SEQ_CLS heads trained in full (modules_to_save)


def _trainable(model) -> int:
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_rows_count_in_every_count(name):
    factory, task_type = MODELS[name]
    lora = APETConfig.lora(r=2, task_type=task_type)
    config = APETConfig.lora(r=2, task_type=task_type, trainable_token_indices=IDS)
    counted = count_trainable_parameters(factory(), config)
    assert counted == count_trainable_parameters(factory(), lora) + len(IDS) * DIM
    model = get_peft_model(factory(), config)
    assert _trainable(model) == counted + HEADS.get(name, 0)  # what print_trainable_parameters prints
    summary = model.base_model.adapter_summary()
    assert summary.splitlines()[-1].split()[-1] == str(counted)
    token_rows = [line for line in summary.splitlines() if " tokens " in line]
    assert len(token_rows) == 1 and f"({len(IDS)}, {DIM})" in token_rows[0]  # tied layers share one set of rows


def test_config_budget_is_the_exact_total_including_the_rows():
    def config(total):
        return APETConfig.combine(APETConfig.lora(r=4, mask="discrete"), num_trainable_params=total,
                                  task_type="CAUSAL_LM", trainable_token_indices=IDS)

    assert count_trainable_parameters(tiny_llama(), config(500)) == 500
    model = get_peft_model(tiny_llama(), config(500))
    assert _trainable(model) == 500
    assert sum(v.numel() for n, v in model.named_parameters() if "trainable_tokens_delta" in n) == len(IDS) * DIM
    with pytest.raises(ValueError, match=r"`num_trainable_params`=96 leaves 0 entries.*fixed parts \(96\)"):
        count_trainable_parameters(tiny_llama(), config(len(IDS) * DIM))


def _train_step(model, name: str) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = model_inputs(name, labels=True)
    inputs["input_ids"][:, :3] = torch.tensor(IDS)  # the new tokens occur in the batch
    model(**inputs).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("name,indices", [("gpt2", IDS), ("llama", {"embed_tokens": IDS, "lm_head": [5, 6]})])
def test_train_save_reload_merge(tmp_path, name, indices):
    factory, task_type = MODELS[name]
    base = factory()
    embedding_before = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(base, APETConfig.lora(r=2, task_type=task_type, trainable_token_indices=indices))
    _train_step(model, name)
    inputs = model_inputs(name)
    inputs["input_ids"][:, :3] = torch.tensor(IDS)
    trained = model_output(model, inputs)

    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == indices  # the ids live in the config...
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        rows = {k: f.get_slice(k).get_shape() for k in f.keys() if "token" in k}
    expected_rows = {"gpt2": {"transformer.wte": [3, DIM]},  # tied lm_head: no copy of its own
                     "llama": {"model.embed_tokens": [3, DIM], "lm_head": [2, DIM]}}[name]
    assert rows == {f"base_model.model.{m}.token_adapter.trainable_tokens_delta": s  # ...and only the rows in the file
                    for m, s in expected_rows.items()}

    reloaded = PeftModel.from_pretrained(factory(), tmp_path / "adapter", is_trainable=True)
    torch.testing.assert_close(model_output(reloaded, inputs), trained)
    assert _trainable(reloaded) == _trainable(model)

    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, inputs), trained, atol=1e-5, rtol=0)
    embedding = merged.get_input_embeddings().weight.detach()
    others = [i for i in range(embedding.shape[0]) if i not in IDS]
    assert torch.equal(embedding[others], embedding_before[others])  # only the chosen rows changed
    assert not torch.allclose(embedding[IDS], embedding_before[IDS])
    if name == "gpt2":  # tied: the output layer reads the same merged rows
        assert merged.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()


def _untouched(model) -> bool:
    return not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


@pytest.mark.parametrize("factory,kwargs,message", [
    (tiny_llama, {"trainable_token_indices": [3, 96]}, r"id 96 is out of range for model.embed_tokens, which has 96 "
                                                       r"rows.*resize_token_embeddings"),
    (tiny_llama, {"trainable_token_indices": {"embeddings": [1]}}, r"'embeddings' matches no module.*embed_tokens"),
    (tiny_llama, {"trainable_token_indices": {"q_proj": [1]}, "target_modules": ["v_proj"]},
     r"q_proj is a Linear; token rows train rows of an nn.Embedding or of the model's bias-free output"),
    (tiny_gpt2, {"trainable_token_indices": {"wte": [1], "lm_head": [2]}}, r"different ids.*tied embeddings"),
    (tiny_llama, {"trainable_token_indices": {"lm_head": [1]}, "target_modules": ["lm_head"]},
     r"rows of \['lm_head'\], which parts of the adapter also target"),
    (tiny_bert, {"trainable_token_indices": {"word_embeddings": [1]}, "modules_to_save": ["word_embeddings"]},
     r"targets \['word_embeddings'\], which `modules_to_save` trains in full"),
])
def test_bad_token_targets_are_refused_before_the_model_changes(factory, kwargs, message):
    model = factory()
    task_type = "SEQ_CLS" if factory is tiny_bert else "CAUSAL_LM"
    config = APETConfig.lora(r=2, task_type=task_type, **kwargs)
    with pytest.raises(ValueError, match=message):
        count_trainable_parameters(model, config)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config)
    assert _untouched(model)


def test_prompt_and_token_rows_on_one_embedding_are_refused():
    config = APETConfig.prompt(num_virtual_tokens=2, task_type="CAUSAL_LM", trainable_token_indices=[1])
    with pytest.raises(ValueError, match=r"rows of \['model.embed_tokens'\], which parts of the adapter also target"):
        get_peft_model(tiny_llama(), config)


def test_checkpoint_rows_must_fit_the_config(tmp_path):
    model = get_peft_model(tiny_llama(), APETConfig.lora(r=2, task_type="CAUSAL_LM", trainable_token_indices=IDS))
    model.save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "trainable_token_indices": IDS + [50]}))
    with pytest.raises(ValueError, match=r"trainable_tokens_delta: shape \(3, 32\) in the checkpoint, \(4, 32\)"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    config_file.write_text(json.dumps(saved))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "token" not in k}, weights)
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"no trainable token rows \['model.embed_tokens.token_adapter"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert _untouched(base)


def test_configs_without_rows_save_as_before():
    assert "trainable_token_indices" not in APETConfig.lora().to_dict()  # readable by peft-apet 0.1
    assert APETConfig.lora(trainable_token_indices=(4, 2)).to_dict()["trainable_token_indices"] == [4, 2]


@pytest.mark.parametrize("name,indices", [("gpt2", IDS), ("llama", {"embed_tokens": IDS, "lm_head": [5, 6]})])
def test_same_rows_and_count_as_peft_lora(name, indices):
    """What a PEFT user expects: the rows PEFT's LoRA trains for the same `trainable_token_indices`, same outputs."""
    from peft import LoraConfig

    factory, task_type = MODELS[name]
    targets = ["c_attn"] if name == "gpt2" else ["q_proj", "v_proj"]
    apet = get_peft_model(factory(), APETConfig.lora(r=2, target_modules=targets, task_type=task_type,
                                                     trainable_token_indices=indices))
    lora = get_peft_model(factory(), LoraConfig(r=2, target_modules=targets, task_type=task_type,
                                                trainable_token_indices=indices))
    assert _trainable(apet) == _trainable(lora)
    rows = {n: p.shape for n, p in apet.named_parameters() if "trainable_tokens_delta" in n}
    assert rows == {n: p.shape for n, p in lora.named_parameters() if "trainable_tokens_delta" in n}
    with torch.no_grad():  # the same trained rows give the same outputs (the LoRA paths start at zero in both)
        for model in (apet, lora):
            for n, p in model.named_parameters():
                if "trainable_tokens_delta" in n:
                    p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    inputs = model_inputs(name)
    inputs["input_ids"][:, :3] = torch.tensor(IDS)
    torch.testing.assert_close(model_output(apet, inputs), model_output(lora, inputs))


def test_a_key_matching_two_modules_that_share_a_weight_is_refused():
    """T5's encoder and decoder `embed_tokens` share `shared`'s weight, but PEFT wraps each with rows of its own:
    one count for two row sets made the budget wrong and the saved adapter unloadable. Refused, naming the owner."""
    factory, task_type = MODELS["t5"]
    config = APETConfig.combine(APETConfig.delta(mask="discrete"), num_trainable_params=500, task_type=task_type,
                                trainable_token_indices={"embed_tokens": [3, 4]})
    base = factory()
    modules = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=r"encoder.embed_tokens and decoder.embed_tokens share one weight.*'shared'"):
        get_peft_model(base, config)
    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    config = APETConfig.combine(APETConfig.delta(mask="discrete"), num_trainable_params=500, task_type=task_type,
                                trainable_token_indices={"shared": [3, 4]})
    assert get_peft_model(factory(), config).get_nb_trainable_parameters()[0] == 500


@pytest.mark.parametrize("first,second", [([5, 6], None), (None, [5, 6])])
def test_adapters_of_one_model_with_rows_on_different_modules_are_refused(first, second):
    """PEFT cannot save such a pair (KeyError in `get_peft_model_state_dict`, for its own LoRA too): refused when
    the second adapter is added, before it changes the model, instead of at save time after training."""
    model = get_peft_model(tiny_llama(), APETConfig.lora(r=2, task_type="CAUSAL_LM", trainable_token_indices=first))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter 'other' trains token rows \(`trainable_token_indices`\) of "
                                         r".*other adapters \['default'\].*PEFT cannot save"):
        model.add_adapter("other", APETConfig.lora(r=2, task_type="CAUSAL_LM", trainable_token_indices=second))
    assert list(model.peft_config) == ["default"]
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()


def test_adapters_with_rows_on_the_same_module_save_and_reload(tmp_path):
    inputs = model_inputs("llama")
    model = get_peft_model(tiny_llama(), APETConfig.lora(r=2, task_type="CAUSAL_LM", trainable_token_indices=[5, 6],
                                                         init_weights=False))
    model.add_adapter("other", APETConfig.lora(r=2, task_type="CAUSAL_LM", trainable_token_indices=[7],
                                               init_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(0.5)
    expected = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        expected[adapter] = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    for adapter in ("default", "other"):
        reloaded.set_adapter(adapter)
        torch.testing.assert_close(model_output(reloaded, inputs), expected[adapter], rtol=0, atol=0)
