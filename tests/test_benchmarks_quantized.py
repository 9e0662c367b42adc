"""Smoke test of `python -m benchmarks.quantized`: the whole 4-bit benchmark on a tiny random Llama, synthetic task.

Checks what the benchmark claims about its runs, never timings: every method ran at every k, APET got exactly QLoRA's
trainable count, the trainable state is read from the real tensors (16 bytes per fp32 entry with AdamW, plus step
counters), and the report has a row per method with its ratios to QLoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
from benchmarks import quantized  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized_smoke")
    assert quantized.main(["--smoke", "--out", str(out)]) == 0
    return out


def test_every_method_at_equal_k(smoke):
    results = json.loads((smoke / "results.json").read_text())
    records = results["records"]
    planned = results["meta"]["methods"]
    assert [(r["k"], r["method"]) for r in records] == [
        (k, m) for k in quantized.SETTINGS["smoke"].budgets for m in planned[str(k)]]
    # QLoRA covers the first of the tiny Llama's 2 layers at k = 200 and both at 2,000: only at 200 does APET also
    # run on QLoRA's layers alone
    assert planned["200"] == list(quantized.METHODS) and quantized.SAME_LAYERS not in planned["2000"]
    assert not [r for r in records if "error" in r]
    for k in quantized.SETTINGS["smoke"].budgets:
        counts = {r["method"]: r["trainable"] for r in records if r["k"] == k}
        assert len(set(counts.values())) == 1, counts  # APET gets exactly QLoRA's count
        for r in (r for r in records if r["k"] == k):
            state = r["state_bytes"]
            assert state["params"] == state["grads"] == 4 * r["trainable"]
            assert state["optimizer"] == 8 * r["trainable"] + 4 * state["param_tensors"]  # moments + step counters
            assert len(r["step_s"]) == len(r["tokens_per_step"]) == quantized.SETTINGS["smoke"].steps
            assert all(t >= quantized.SETTINGS["smoke"].batch_size for t in r["tokens_per_step"])
            assert 0.0 <= r["test"]["generation_accuracy"] <= 1.0
            assert r["tensor_peak_bytes"] > 0 and r["saved_for_backward_bytes"] > 0
    rows = results["summary"]
    assert {r["method"] for r in rows if r["method"] == "qlora" and r["step_ratio"] == 1.0} == {"qlora"}


def test_report(smoke):
    text = (smoke / "results.md").read_text()
    for method in ("qlora", "apet-discrete", "apet-adjacent"):
        assert text.count(f"| {method} |") == 2
    assert text.count(f"| {quantized.SAME_LAYERS} |") == 1
    assert "Target: APET discrete delta" in text
    assert "| tensor peak MiB | tensor peak ratio |" in text and "with the tensor peak (" in text
    # the reference's own row: ratios of exactly 1 (step, RSS peak, tensor peak, saved, state)
    row = next(line for line in text.splitlines() if line.startswith("| 200 | qlora |"))
    assert row.split(" | ")[5:10:2] == ["1.00", "1.00", "1.00"]


def test_isolated_run_in_a_fresh_process():
    record = quantized.run_isolated("apet-discrete", 200, quantized.SETTINGS["smoke"], True, print)
    assert record["trainable"] == 1088  # r=1 LoRA count of the first layer's 7 projections of the tiny Llama
    assert record["saved_for_backward_bytes"] > 0 and record["peak_rss_delta"] > 0


def test_apet_on_qlora_layers_targets_only_those_layers():
    """At k = 200 QLoRA trains r = 1 on layer 0 of the tiny Llama; APET on QLoRA's layers gets the same count there."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        task = quantized.smoke_task(Path(tmp))
        base = quantized.load_base(task.path)
        lora, count, _ = quantized.qlora_config(quantized.linear_shapes(base), 200)
        model = quantized.attach(quantized.SAME_LAYERS, base, lora, count)
        trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == count == 1088
    assert trainable and all(".layers.0." in n for n in trainable)
