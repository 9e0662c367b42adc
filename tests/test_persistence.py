"""Saving and loading: safetensors files, fresh processes, AutoPeftModel*, load_adapter, Trainer resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MODELS, model_inputs, model_output
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from peft_apet import APETConfig, APETLayer

AUTO = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM,
        "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM}
AUTO_PEFT = {"SEQ_CLS": "AutoPeftModelForSequenceClassification", "CAUSAL_LM": "AutoPeftModelForCausalLM",
             "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM"}


def configs(task_type: str) -> dict[str, APETConfig]:
    """One config per flavour, all non-identity so that a wrong load shows up in the outputs."""
    common = dict(task_type=task_type, init_weights=False)
    return {
        "lora-discrete": APETConfig.lora(mask="discrete", num_trainable_params=101, **common),
        "delta-adjacent": APETConfig.delta(mask="adjacent", mask_axis=1, num_trainable_params=97, **common),
        "unified": APETConfig.combine(APETConfig.lora(mask="adjacent"), APETConfig.adapter(mask="discrete"),
                                      APETConfig.bitfit(), APETConfig.delta(mask="discrete"),
                                      num_trainable_params=5000, **common),
        "prompt": APETConfig.prompt(num_virtual_tokens=3, mask="discrete", num_trainable_params=50, **common),
    }


def build(model_name: str, tmp_path, flavour: str):
    factory, task_type = MODELS[model_name]
    base_dir = tmp_path / f"{model_name}-base"
    if not base_dir.exists():
        factory().save_pretrained(base_dir)
    base = AUTO[task_type].from_pretrained(base_dir).eval()
    return get_peft_model(base, configs(task_type)[flavour]).eval(), base_dir


WORKER = textwrap.dedent(
    """
    import json, sys, torch, peft_apet, peft
    from safetensors.torch import save_file
    from peft import PeftModel
    import transformers
    for case in json.load(open(sys.argv[1])):
        inputs = {k: torch.tensor(v) for k, v in case["inputs"].items()}
        auto_peft = getattr(peft, case["auto_peft"]).from_pretrained(case["adapter"]).eval()
        base = getattr(transformers, case["auto"]).from_pretrained(case["base"]).eval()
        plain = PeftModel.from_pretrained(base, case["adapter"]).eval()
        with torch.no_grad():
            save_file({"auto": auto_peft(**inputs).logits.contiguous(), "plain": plain(**inputs).logits.contiguous()},
                      case["out"])
    """
)


def test_save_then_load_in_a_fresh_process_gives_identical_outputs(tmp_path):
    cases, expected = [], {}
    for model_name in MODELS:
        task_type = MODELS[model_name][1]
        for flavour in configs(task_type):
            model, base_dir = build(model_name, tmp_path, flavour)
            inputs = model_inputs(model_name)
            adapter_dir = tmp_path / f"{model_name}-{flavour}"
            model.save_pretrained(adapter_dir)
            files = sorted(p.name for p in adapter_dir.iterdir())
            assert "adapter_model.safetensors" in files and "adapter_model.bin" not in files
            saved = json.loads((adapter_dir / "adapter_config.json").read_text())
            assert saved["peft_type"] == "APET" and saved["base_model_name_or_path"] == str(base_dir)
            key = f"{model_name}-{flavour}"
            expected[key] = model_output(model, inputs)
            cases.append({"inputs": {k: v.tolist() for k, v in inputs.items()}, "adapter": str(adapter_dir),
                          "base": str(base_dir), "auto": AUTO[task_type].__name__,
                          "auto_peft": AUTO_PEFT[task_type], "out": str(tmp_path / f"{key}.safetensors")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "worker.py").write_text(WORKER)
    subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "cases.json")], check=True,
                   capture_output=True, text=True)
    for key, logits in expected.items():
        loaded = load_file(tmp_path / f"{key}.safetensors")
        assert torch.equal(loaded["auto"], logits), key
        assert torch.equal(loaded["plain"], logits), key


def test_saved_state_is_compact(tmp_path):
    model, _ = build("llama", tmp_path, "lora-discrete")
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    values = {k: v for k, v in tensors.items() if k.endswith(".values")}
    assert sum(v.numel() for v in values.values()) == 101
    assert all(v.dim() == 1 for v in tensors.values())
    # Discrete masks are stored Elias-Fano coded (uint8), see tests/test_index_codec.py.
    assert all(v.dtype == torch.uint8 for k, v in tensors.items() if k.endswith(".index"))


def test_peft_config_from_pretrained_and_load_adapter(tmp_path):
    model, _ = build("gpt2", tmp_path, "unified")
    inputs = model_inputs("gpt2")
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, APETConfig) and config.operations == ["lora", "adapter", "bias", "delta"]

    other, _ = build("gpt2", tmp_path, "lora-discrete")
    other.load_adapter(tmp_path / "adapter", adapter_name="unified")
    other.set_adapter("unified")
    torch.testing.assert_close(model_output(other, inputs), expected, rtol=0, atol=0)
    other.delete_adapter("unified")
    assert not any(isinstance(m, APETLayer) and "unified" in m.apet_weights for m in other.modules())


def test_a_checkpoint_saved_with_another_name_loads_as_default(tmp_path):
    model, base_dir = build("bert", tmp_path, "lora-discrete")
    model.add_adapter("second", APETConfig.bitfit(task_type="SEQ_CLS", init_weights=False))
    model.set_adapter("second")
    inputs = model_inputs("bert")
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path / "out", selected_adapters=["second"])
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir),
                                       tmp_path / "out" / "second").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, rtol=0, atol=0)


@pytest.fixture
def tiny_classification_dataset():
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (24, 8), generator=g)
    labels = (ids[:, 0] > 48).long()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 24,
                                       "labels": labels.tolist()})


def _trainer(model, output_dir, dataset, max_steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_steps=2, save_strategy="steps",
                             logging_steps=1, report_to=[], seed=0, data_seed=0, use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=dataset)


def test_trainer_trains_and_resumes_to_the_same_adapter(tmp_path, tiny_classification_dataset):
    factory, task_type = MODELS["bert"]
    config = APETConfig.delta(mask="discrete", num_trainable_params=123, task_type=task_type)

    straight = get_peft_model(factory(), config)
    _trainer(straight, tmp_path / "a", tiny_classification_dataset, 4).train()
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").exists()

    resumed = get_peft_model(factory(), APETConfig.delta(mask="discrete", num_trainable_params=123,
                                                          task_type=task_type))
    trainer = _trainer(resumed, tmp_path / "a", tiny_classification_dataset, 4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))

    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    values = [p for n, p in straight.named_parameters() if ".apet_weights." in n]
    assert sum(p.numel() for p in values) == 123 and any(p.abs().sum() > 0 for p in values)


def test_safetensors_roundtrip_helper_is_exact(tmp_path):
    # Guards the test worker above: logits written by save_file read back bit-identical.
    t = torch.randn(3, 4)
    save_file({"t": t}, tmp_path / "t.safetensors")
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], t)


@pytest.mark.parametrize("name", ["bias", "delta", "lora_A", "index", "values", "query", "0", "model", "weight"])
def test_adapter_names_that_are_part_of_the_keys_are_refused(name):
    """PEFT's save_pretrained drops, from every other adapter's file, each key containing '.<name>.': an adapter
    named 'bias' cut every bias entry out of a combined adapter's file, which then did not load."""
    factory, task_type = MODELS["bert"]
    model = get_peft_model(factory(), APETConfig.combine(APETConfig.lora(mask="discrete"), APETConfig.bitfit(),
                                                         num_trainable_params=2000, task_type=task_type))
    with pytest.raises(ValueError, match=rf"adapter name '{name}' is also a part of this model's parameter names"):
        model.add_adapter(name, APETConfig.bitfit(task_type=task_type))
    assert list(model.peft_config) == ["default"]


def test_a_state_dict_missing_adapter_tensors_is_not_saved(tmp_path, monkeypatch):
    """The safety net behind the name check: if PEFT's adapter state dict lacks some of the adapter's tensors,
    saving raises instead of writing a file that cannot be loaded back."""
    import peft_apet.model as apet_model

    factory, task_type = MODELS["bert"]
    model = get_peft_model(factory(), APETConfig.combine(APETConfig.lora(mask="discrete"), APETConfig.bitfit(),
                                                         num_trainable_params=2000, task_type=task_type))
    monkeypatch.setattr(apet_model, "check_adapter_name", lambda *args: None)  # as before the name check
    model.add_adapter("bias", APETConfig.bitfit(task_type=task_type))
    with pytest.raises(ValueError, match=r"saving APET adapter 'default': PEFT's state dict holds \d+ of its \d+"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_an_empty_state_dict_saves_as_for_peft(tmp_path):
    """transformers' Trainer saves `state_dict={}` under DeepSpeed ZeRO-3 without gathered weights (then writes the
    DeepSpeed checkpoint): the completeness check must not refuse that placeholder."""
    factory, task_type = MODELS["llama"]  # no modules_to_save head (PEFT itself needs its tensors then)
    model = get_peft_model(factory(), APETConfig.delta(num_trainable_params=100, task_type=task_type))
    model.save_pretrained(tmp_path, state_dict={})
    assert (tmp_path / "adapter_config.json").exists()
