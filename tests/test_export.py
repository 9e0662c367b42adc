"""Serving what was trained: `export_lora` to a standard PEFT LoRA folder, merged plain models, model cards, and
what a user sees when `import peft_apet` is forgotten.

The "fresh process" checks run a Python subprocess in which `peft_apet` (and, for merged models, `peft`) cannot be
imported: their `sys.modules` entries are None, so any import of them raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_inputs, model_output, tiny_bert, tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peft_apet import APETConfig, export_lora
from peft_apet.model_card import HEADER_END, HEADER_START

FACTORIES = {"bert": (tiny_bert, AutoModelForSequenceClassification, "SEQ_CLS"),
             "gpt2": (tiny_gpt2, AutoModelForCausalLM, "CAUSAL_LM"),
             "llama": (tiny_llama, AutoModelForCausalLM, "CAUSAL_LM")}


def _fresh_outputs(tmp_path, model_name: str, runs: list, block=("peft_apet",)) -> list[torch.Tensor]:
    """Logits of each `(base_dir, adapter_dir or None)` in `runs` (the adapter loaded by plain PEFT), computed in one
    new process where the modules in `block` cannot be imported."""
    auto_class = FACTORIES[model_name][1].__name__
    inputs = tmp_path / "inputs.pt"
    torch.save({k: v for k, v in model_inputs(model_name).items() if k != "labels"}, inputs)
    out = tmp_path / "fresh_logits.pt"
    runs = [(str(base), str(adapter) if adapter else None) for base, adapter in runs]
    script = textwrap.dedent(f"""
        import sys
        for name in {list(block)!r}:
            sys.modules[name] = None  # any `import {{name}}` now raises ImportError
        import torch
        import transformers
        outputs = []
        for base_dir, adapter_dir in {runs!r}:
            model = transformers.{auto_class}.from_pretrained(base_dir).eval()
            if adapter_dir is not None:
                from peft import PeftModel
                model = PeftModel.from_pretrained(model, adapter_dir).eval()
            with torch.no_grad():
                outputs.append(model(**torch.load({str(inputs)!r})).logits)
        assert not any(m == "peft_apet" or m.startswith("peft_apet.") for m in sys.modules if sys.modules[m]), \\
            "peft_apet was imported"
        torch.save(outputs, {str(out)!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def _apet_model(model_name: str, base_dir, config: APETConfig):
    """The APET model on the base saved in `base_dir`, with non-zero adapter values and a changed head."""
    model = get_peft_model(FACTORIES[model_name][1].from_pretrained(base_dir).eval(), config).eval()
    with torch.no_grad():  # a trained head (modules_to_save) must travel with the export
        for name, param in model.named_parameters():
            if "modules_to_save" in name or "trainable_tokens_delta" in name:
                param.add_(0.3)
    return model


@pytest.fixture
def saved_base(tmp_path):
    def save(model_name: str):
        base_dir = tmp_path / f"base-{model_name}"
        FACTORIES[model_name][0]().save_pretrained(base_dir)
        return base_dir
    return save


EXPORT_CASES = {
    # model: config kwargs (init_weights=False: B is random, so the adapter changes the outputs)
    "bert": dict(r=4, lora_alpha=8, mask="discrete", num_trainable_params=300),
    "gpt2": dict(r=4, lora_alpha=16, mask="adjacent", mask_axis=1, mask_pairing="independent",
                 num_trainable_params=500, trainable_token_indices=[5, 7]),  # tied wte / lm_head
    "llama": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                  trainable_token_indices={"embed_tokens": [3, 4, 90], "lm_head": [10]}),
}


@pytest.mark.parametrize("model_name", sorted(EXPORT_CASES))
def test_export_lora_loads_in_plain_peft_with_the_same_outputs(tmp_path, saved_base, model_name):
    base_dir = saved_base(model_name)
    task_type = FACTORIES[model_name][2]
    config = APETConfig.lora(task_type=task_type, init_weights=False, **EXPORT_CASES[model_name])
    model = _apet_model(model_name, base_dir, config)
    expected = model_output(model, model_inputs(model_name))
    out = tmp_path / "lora"
    lora_config = export_lora(model, out)

    saved = json.loads((out / "adapter_config.json").read_text())
    part = config.parts[0]
    assert saved["peft_type"] == "LORA" and saved["r"] == part.r and saved["lora_alpha"] == part.lora_alpha
    assert saved["task_type"] == task_type and saved["base_model_name_or_path"] == str(base_dir)
    lora_layers = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "apet_weights")]
    assert sorted(saved["target_modules"]) == sorted(lora_layers)  # exact module names
    assert saved["fan_in_fan_out"] is (model_name == "gpt2")  # GPT-2's Conv1D
    assert saved["trainable_token_indices"] == config.trainable_token_indices
    assert lora_config.r == part.r
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor(f"base_model.model.{lora_layers[0]}.lora_A.weight")
    assert a.shape[0] == part.r and all(".lora_A.weight" in k or ".lora_B.weight" in k or "classifier" in k
                                        or "trainable_tokens_delta" in k for k in keys)
    if part.mask is not None:
        assert int((a == 0).sum()) > 0  # masked entries are zeros of the LoRA matrix
    if model_name == "bert":
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys

    fresh, base_only = _fresh_outputs(tmp_path, model_name, [(base_dir, out), (base_dir, None)])
    assert (expected - base_only).abs().max() > 1e-3  # the adapter matters...
    torch.testing.assert_close(fresh, expected, atol=1e-5, rtol=0)  # ...and plain PEFT reproduces it


UNMERGEABLE = "Adapter and prompt parts cannot be merged either.*"


@pytest.mark.parametrize("config,named,extra", [
    (APETConfig.combine(APETConfig.lora(), APETConfig.delta(mask=None)), r"\['delta'\]", ""),
    (APETConfig.combine(APETConfig.lora(), APETConfig.bitfit()), r"\['bias'\]", ""),
    (APETConfig.adapter(bottleneck=4), r"\['adapter'\]", UNMERGEABLE),
    (APETConfig.prompt(num_virtual_tokens=3, task_type="SEQ_CLS"), r"\['prompt'\]", UNMERGEABLE),
])
def test_export_lora_refuses_parts_lora_cannot_express_before_writing(tmp_path, config, named, extra):
    model = get_peft_model(tiny_bert(), config)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=rf"parts {named}.*merge_and_unload\(\).*{extra}Nothing was written"):
        export_lora(model, out)
    assert not out.exists()


def test_export_lora_refuses_other_adapters_and_merged_ones(tmp_path):
    model = get_peft_model(tiny_bert(), APETConfig.lora(task_type="SEQ_CLS", init_weights=False))
    with pytest.raises(ValueError, match=r"`adapter_name`='other'.*\['default'\]"):
        export_lora(model, tmp_path / "x", adapter_name="other")
    with pytest.raises(ValueError, match="must be a peft.PeftModel"):
        export_lora(model.base_model.model, tmp_path / "x")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"):
        export_lora(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model.unmerge_adapter()
    export_lora(model, tmp_path / "x")
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()
    export_lora(model, tmp_path / "x")  # an earlier export may be replaced...
    model.save_pretrained(tmp_path / "apet")
    saved = {f: (tmp_path / "apet" / f).read_bytes() for f in os.listdir(tmp_path / "apet")}
    with pytest.raises(ValueError, match=r"already holds an adapter of type APET.*Nothing was written"):
        export_lora(model, tmp_path / "apet")  # ...but not the APET adapter itself
    assert {f: (tmp_path / "apet" / f).read_bytes() for f in os.listdir(tmp_path / "apet")} == saved


MERGE_CASES = {
    "bert": APETConfig.combine(APETConfig.lora(r=2), APETConfig.bitfit(), APETConfig.delta(mask="discrete"),
                               num_trainable_params=2_000, task_type="SEQ_CLS", init_weights=False),
    "gpt2": APETConfig.combine(APETConfig.lora(r=2), APETConfig.delta(mask="adjacent"), num_trainable_params=900,
                               task_type="CAUSAL_LM", init_weights=False, trainable_token_indices=[4, 8]),
    "llama": APETConfig.combine(APETConfig.lora(r=2), APETConfig.delta(mask="discrete"), num_trainable_params=700,
                                task_type="CAUSAL_LM", init_weights=False, trainable_token_indices=[5]),
}


@pytest.mark.parametrize("model_name", sorted(MERGE_CASES))
def test_merged_model_loads_without_peft_or_peft_apet(tmp_path, saved_base, model_name):
    base_dir = saved_base(model_name)
    model = _apet_model(model_name, base_dir, MERGE_CASES[model_name])
    expected = model_output(model, model_inputs(model_name))
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    fresh, base_only = _fresh_outputs(tmp_path, model_name, [(tmp_path / "merged", None), (base_dir, None)],
                                      block=("peft", "peft_apet"))
    assert (expected - base_only).abs().max() > 1e-3
    torch.testing.assert_close(fresh, expected, atol=1e-5, rtol=0)


def _card_top(folder) -> str:
    text = (folder / "README.md").read_text()
    body = text.split("---\n", 2)[2]  # after the YAML front matter
    return "\n".join(body.lstrip("\n").splitlines()[:6])


def test_model_card_says_first_how_to_load_and_export(tmp_path):
    lora = get_peft_model(tiny_bert(), APETConfig.lora(mask="discrete", density=0.5, task_type="SEQ_CLS"))
    lora.save_pretrained(tmp_path / "lora")
    top = _card_top(tmp_path / "lora")
    assert top.startswith(HEADER_START) and HEADER_END in top
    assert "pip install peft-apet" in top and "import peft_apet" in top and "peft_apet.export_lora(" in top
    first = (tmp_path / "lora" / "README.md").read_text()
    lora.save_pretrained(tmp_path / "lora")  # rewriting gives the same card: the lines are replaced, not repeated
    assert (tmp_path / "lora" / "README.md").read_text() == first and first.count(HEADER_START) == 1

    delta = get_peft_model(tiny_bert(), APETConfig.delta(density=0.01, task_type="SEQ_CLS"))
    delta.save_pretrained(tmp_path / "delta")
    top = _card_top(tmp_path / "delta")
    assert top.startswith(HEADER_START) and "pip install peft-apet" in top and "import peft_apet" in top
    assert "export_lora" not in top  # a delta is not LoRA-shaped


def test_forgotten_import_gives_peft_key_error_and_the_card_tells_the_fix(tmp_path):
    """What a user without `import peft_apet` sees (see README "Loading APET adapters"): PEFT looks the saved
    `peft_type` up in its registry before reading anything else, so the error is `KeyError: 'APET'`."""
    model = get_peft_model(tiny_bert(), APETConfig.lora(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "apet")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft_apet"] = None
        from peft import PeftConfig
        PeftConfig.from_pretrained({str(tmp_path / "apet")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode != 0 and "KeyError: 'APET'" in result.stderr
    assert "import peft_apet" in _card_top(tmp_path / "apet")


def test_apet_loader_on_a_lora_folder_says_what_it_is(tmp_path):
    model = get_peft_model(tiny_bert(), APETConfig.lora(task_type="SEQ_CLS"))
    export_lora(model, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"adapter_config.json: this is a LORA adapter, not an APET one.*"
                                         r"PeftModel.from_pretrained"):
        APETConfig.from_pretrained(str(tmp_path / "lora"))
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "lora")  # plain PEFT loads it, here too
    assert reloaded.peft_config["default"].peft_type == "LORA"


def test_merging_new_biases_warns_and_the_config_flags_make_them_load(tmp_path, saved_base):
    """BitFit on a bias-free Llama creates biases; merged, they are tensors LlamaConfig does not declare by default."""
    base_dir = saved_base("llama")
    config = APETConfig.combine(APETConfig.lora(r=2), APETConfig.bitfit(), task_type="CAUSAL_LM", init_weights=False)
    model = _apet_model("llama", base_dir, config)
    expected = model_output(model, model_inputs("llama"))
    with pytest.warns(UserWarning, match=r"gave layers without a bias one.*attention_bias = config.mlp_bias = True"):
        merged = model.merge_and_unload()
    merged.config.attention_bias = merged.config.mlp_bias = True  # every projection got a bias (the defaults)
    merged.save_pretrained(tmp_path / "merged")
    (fresh,) = _fresh_outputs(tmp_path, "llama", [(tmp_path / "merged", None)], block=("peft", "peft_apet"))
    torch.testing.assert_close(fresh, expected, atol=1e-5, rtol=0)

    lora_only = _apet_model("llama", base_dir, APETConfig.lora(task_type="CAUSAL_LM", init_weights=False))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bias part: no warning
        lora_only.merge_and_unload()


def test_unloading_a_merged_bias_part_warns_as_merge_and_unload_does():
    """`unload()` keeps what `merge_adapter()` merged, biases it created included: the same warning."""
    model = get_peft_model(tiny_llama(), APETConfig.bitfit(task_type="CAUSAL_LM", init_weights=False))
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"gave layers without a bias one"):
        model.unload()
    unmerged = get_peft_model(tiny_llama(), APETConfig.bitfit(task_type="CAUSAL_LM", init_weights=False))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing merged: unload gives the base model back, no new bias
        unmerged.unload()


def test_readme_serving_example_runs(tmp_path):
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    block = next(b for b in re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
                 if "export_lora" in b)
    (tmp_path / "serving.py").write_text(block)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root / "src")}
    result = subprocess.run([sys.executable, "serving.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("trainable params: 3,192 ") for line in lines) and lines[-1] == "True True"
    assert json.loads((tmp_path / "lora-export" / "adapter_config.json").read_text())["peft_type"] == "LORA"
