"""push_to_hub at the huggingface_hub API boundary: the exact files and commit, and that they load back."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import huggingface_hub
import torch
from conftest import MODELS, model_inputs, model_output
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_apet import APETConfig


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
