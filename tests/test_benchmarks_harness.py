"""The benchmark harness: its MPNet classifier (`PooledClassifier`) on a tiny random MPNet against its formula, and
its count of the memory autograd saves for backward against hand-counted tensors."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import get_peft_model
from transformers import MPNetConfig, MPNetModel

from benchmarks import harness
from benchmarks.harness import PooledClassifier
from peft_apet import APETConfig

HIDDEN, LABELS = 32, 2


@pytest.fixture(scope="module")
def tiny_mpnet_folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_mpnet")
    MPNetModel(MPNetConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def test_logits_are_the_linear_classifier_on_the_pretrained_pooler(tiny_mpnet_folder):
    torch.manual_seed(1)
    model = PooledClassifier(tiny_mpnet_folder, LABELS).eval()
    saved = MPNetModel.from_pretrained(tiny_mpnet_folder).eval()
    torch.testing.assert_close(model.mpnet.pooler.dense.weight, saved.pooler.dense.weight)  # loaded, not new
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = saved(input_ids=ids).last_hidden_state[:, 0]
        expected = model.classifier(torch.tanh(saved.pooler.dense(first)))
        out = model(input_ids=ids, labels=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, torch.tensor([0, 1, 1])))


def test_peft_trains_the_budget_and_the_linear_head_only(tiny_mpnet_folder):
    model = get_peft_model(PooledClassifier(tiny_mpnet_folder, LABELS),
                           APETConfig.delta(mask="discrete", num_trainable_params=200, task_type="SEQ_CLS"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if "classifier" not in n) == 200
    assert sum(v for n, v in trainable.items() if "classifier" in n) == LABELS * (HIDDEN + 1)
    assert not any("pooler" in n for n in trainable)


def test_saved_for_backward_counts_distinct_non_parameter_storages():
    """A frozen linear layer then a square: autograd saves the layer's input (the weight is a parameter, excluded)
    and the layer's output for the square; a view of the input saved twice counts once."""
    layer = torch.nn.Linear(6, 5)
    x = torch.randn(4, 6, requires_grad=True)
    with harness.SavedForBackward(exclude=list(layer.parameters())) as saved:
        y = layer(x)
        (y * y).sum() + (x[:2] * x[:2]).sum()
    assert saved.bytes == x.nbytes + y.nbytes
    sparse = torch.randn(5, 6).to_sparse_csr().requires_grad_()
    with harness.SavedForBackward() as saved_sparse:
        torch.sparse.mm(sparse, x.T)
    assert saved_sparse.bytes >= sparse.values().nbytes + sparse.col_indices().nbytes + x.nbytes


_RECORDER = ("import json, os, sys, time; time.sleep(float(sys.argv[1])); "
             "json.dump({'threshold': os.environ['MALLOC_MMAP_THRESHOLD_']}, open(sys.argv[-1], 'w'))")


def test_run_recorded_returns_the_record_with_the_threshold_fixed():
    record = harness.run_recorded([sys.executable, "-c", _RECORDER, "0"], timeout_s=60)
    assert record == {"threshold": str(harness.MMAP_THRESHOLD)}


def test_run_recorded_stops_a_process_past_its_time_limit():
    with pytest.raises(RuntimeError, match="ran past 1 s"):
        harness.run_recorded([sys.executable, "-c", _RECORDER, "30"], timeout_s=1)


def test_run_recorded_raises_with_the_failing_process_stderr():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        harness.run_recorded([sys.executable, "-c", "1 / 0"], timeout_s=60)
