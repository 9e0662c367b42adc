"""Training beyond one process with the HF `Trainer` (CPU, gloo, 2 processes): DDP, FSDP2, DeepSpeed ZeRO-2/3.

Every case launches `dist_train.py` under `torchrun --standalone --nproc_per_node 2` and compares with one process
over the same global batches (same data order, dropout off):
- the trained adapter equals one process's (index buffers bit for bit; values up to float rounding: the ranks add
  their gradients in another order), and only rank 0 writes;
- the saved folder is whole: the keys, shapes and dtypes of a one-process save (never a shard), and it reloads, in
  this process that did not train, to the logits the trained sharded model gave;
- FSDP: resuming from a sharded checkpoint gives the adapter of the uninterrupted run;
- ZeRO-3: the 1-D `values` are partitioned across the ranks, the save gathers them, and `merge_adapter()` on the
  partitioned model gives the logits of the unmerged one.
Gradient accumulation: 4 micro-batches of 2 train the adapter one batch of 8 trains.

No launch can hang or leave processes behind: `launch` runs torchrun in its own session under a watchdog that kills
every process the launch started (found by a token in their environment, since torchrun starts each worker in a
session of its own) and fails with the output; it also fails if any such process outlives torchrun.

With `APET_DIST_RESULTS=benchmarks/results/distributed/results.json` every case records its measured differences
and run time there (the numbers README "Scaling out" cites).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from dist_train import base_model, eval_batch  # noqa: E402

SCRIPT = Path(__file__).parent / "dist_train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TIMEOUT_S = 300  # one launch takes 15-60 s on an idle 2-core machine
ATOL = 1e-5  # values after 4 AdamW steps at lr 1e-2; measured differences are 2-3e-7 (float32 summation order)

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install 'peft-apet[distributed]')")


# ----------------------------------------------------------------------------- launching without hangs


def processes_with(token: str) -> list[int]:
    """Ids of live processes whose environment carries `APET_LAUNCH=<token>` (Linux /proc)."""
    needle = f"APET_LAUNCH={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours
                continue
    return found


def kill_all(leader: subprocess.Popen, token: str) -> list[int]:
    """SIGKILL the leader's process group and every process carrying the token (workers have their own groups)."""
    victims = set(processes_with(token))
    for group in {leader.pid, *(_group_of(pid) for pid in victims)} - {None, os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return sorted(victims)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def launch(command: list[str], log: Path, timeout: float = TIMEOUT_S, env: dict | None = None) -> float:
    """Run `command` in a new session under a watchdog; fail with its output if it fails, outlives `timeout`, or
    leaves any process behind. Returns the wall time in seconds."""
    if not Path("/proc").is_dir():
        pytest.skip("tracking the processes a launch starts needs /proc (Linux)")
    token = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu", **(env or {}), "APET_LAUNCH": token}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:  # a file, not a pipe: a stray process holding a pipe open cannot block us
        leader = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = leader.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            killed = kill_all(leader, token)
            leader.wait()
            pytest.fail(f"timed out after {timeout:.0f} s; killed {killed}:\n{log.read_text()[-6000:]}")
    elapsed = time.perf_counter() - start
    deadline = time.monotonic() + 2  # a worker torchrun has signalled may need a moment to go
    while (left := processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        kill_all(leader, token)
        pytest.fail(f"processes {left} outlived the launch (exit code {code}); killed:\n{log.read_text()[-4000:]}")
    assert code == 0, f"exit code {code}:\n{log.read_text()[-6000:]}"
    return elapsed


def train(out: Path, *options: str, backend: str = "none") -> float:
    """`dist_train.py` in one process (backend "none") or under torchrun; returns the wall time."""
    head = [sys.executable] if backend == "none" else TORCHRUN
    return launch([*head, str(SCRIPT), str(out), "--backend", backend, *options], out.with_suffix(".log"))


# ----------------------------------------------------------------------------- comparing


def record(case: str, **numbers: float | str) -> None:
    """Add measured numbers to the results file named by APET_DIST_RESULTS (nothing without it)."""
    path = os.environ.get("APET_DIST_RESULTS")
    if not path:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("cases", {})[case] = numbers
    data["environment"] = {"torch": torch.__version__, "transformers": _version("transformers"),
                           "accelerate": _version("accelerate"), "peft": _version("peft"),
                           "deepspeed": _version("deepspeed"), "processes": 2, "device": "cpu (gloo)"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def same_adapter(reference: Path, other: Path, atol: float = ATOL) -> float:
    """Assert `other` is the adapter folder `reference` is (whole, same config, index bits, trained floats up to
    `atol`); return the largest difference of the floats."""
    ref, got = (load_file(d / "adapter_model.safetensors") for d in (reference, other))
    assert got.keys() == ref.keys()
    for key in ref:
        assert (got[key].shape, got[key].dtype) == (ref[key].shape, ref[key].dtype), key
    values = [k for k in ref if k.endswith(".values")]
    assert values and max(ref[k].abs().max().item() for k in values) > 100 * atol  # the adapter was trained
    worst = 0.0
    for key in ref:
        if ref[key].is_floating_point():  # APET values and modules_to_save (the classifier head)
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=atol, msg=key)
            worst = max(worst, (got[key] - ref[key]).abs().max().item())
        else:
            assert torch.equal(got[key], ref[key]), key
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (reference, other)]
    assert configs[0] == configs[1]
    return worst


def reload_difference(run: Path, model: str) -> float:
    """Load `run/adapter` onto a fresh base model here (a process that did not train) and return the largest
    difference from the logits the trained, still sharded model gave (`run/logits.pt`)."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(base_model(model), run / "adapter").eval()
    with torch.no_grad():
        logits = loaded(**eval_batch()).logits
    trained = torch.load(run / "logits.pt")
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-6)
    return (logits - trained).abs().max().item()


def only_rank_0_wrote(run: Path) -> None:
    assert set((run / "writes.txt").read_text().split()) == {"0"}


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """The one-process run of (model, adapter, *options), trained once per session."""
    cache: dict[tuple, tuple[Path, float]] = {}

    def get(model: str, adapter: str, *options: str) -> Path:
        key = (model, adapter, *options)
        if key not in cache:
            out = tmp_path_factory.mktemp("one") / "_".join(key)
            cache[key] = (out, train(out, "--model", model, "--adapter", adapter, *options))
        return cache[key][0]

    return get


def run_info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


# ----------------------------------------------------------------------------- FSDP


def check_fsdp(tmp_path, one_process, backend: str, model: str, adapter: str) -> None:
    run = tmp_path / backend
    seconds = train(run, "--model", model, "--adapter", adapter, "--resume-at", "2", backend=backend)
    info = run_info(run)
    assert info["fsdp"] and info["world_size"] == 2
    assert info["values_local_numel"] < info["values_numel"]  # the values really were sharded
    single = one_process(model, adapter)
    numbers = {"max_abs_diff_vs_one_process": same_adapter(single / "adapter", run / "adapter"),
               "max_abs_diff_resumed_vs_uninterrupted": same_adapter(run / "adapter", run / "resumed", atol=1e-7),
               "max_abs_diff_reloaded_logits": reload_difference(run, model), "launch_seconds": round(seconds, 1)}
    assert (run / "trainer" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # the checkpoint was sharded
    only_rank_0_wrote(run)
    record(f"{backend}/{model}/{adapter}", **numbers)


@needs_gloo
@pytest.mark.parametrize("model", ["bert", "llama"])
def test_fsdp2_trains_saves_and_resumes_like_one_process(tmp_path, one_process, model):
    check_fsdp(tmp_path, one_process, "fsdp2", model, "combined")


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "llama"])
@pytest.mark.parametrize("adapter", ["delta", "lora"])
def test_fsdp2_each_part(tmp_path, one_process, model, adapter):
    check_fsdp(tmp_path, one_process, "fsdp2", model, adapter)


@needs_gloo
@pytest.mark.slow
def test_trainer_fsdp_on_cpu_without_the_gate_is_ddp(tmp_path, one_process):
    """What a user gets today: accelerate ignores the Trainer's FSDP plugin on CPU and trains plain DDP."""
    run = tmp_path / "fallback"
    train(run, "--keep-cpu-gate", backend="fsdp2")
    info = run_info(run)
    assert not info["fsdp"] and info["wrapper"] == "DistributedDataParallel"
    same_adapter(one_process("bert", "combined") / "adapter", run / "adapter")


# ----------------------------------------------------------------------------- DeepSpeed


def check_zero(tmp_path, one_process, stage: int, model: str) -> None:
    run = tmp_path / f"zero{stage}"
    options = ["--merge-check"] if stage == 3 else []
    seconds = train(run, "--model", model, *options, backend=f"zero{stage}")
    info = run_info(run)
    assert info["deepspeed"] and info["world_size"] == 2 and info["wrapper"] == "DeepSpeedEngine"
    single = one_process(model, "combined")
    if stage == 3:  # each rank holds only its partition of the 1-D values, and every index buffer whole
        assert info["values_local_numel"] < info["values_numel"] == run_info(single)["values_numel"]
        assert info["index_numel"] == run_info(single)["index_numel"] > 0
    numbers = {"max_abs_diff_vs_one_process": same_adapter(single / "adapter", run / "adapter"),
               "max_abs_diff_reloaded_logits": reload_difference(run, model), "launch_seconds": round(seconds, 1)}
    if stage == 3:
        merge = json.loads((run / "merge.json").read_text())
        assert merge["adapter_effect_max_abs"] > 1e-3  # merging a no-op adapter would prove nothing
        if model == "bert":  # biases, LoRA and deltas merge into tensors ZeRO-3 partitions
            assert merge["merged_max_abs_diff"] <= 1e-5 and merge["unmerged_max_abs_diff"] <= 1e-5
        else:  # BitFit adds biases to Llama's bias-free projections: merging would create parameters
            assert "ZeRO-3" in merge["refused"] and "has no bias" in merge["refused"]
            assert merge["unchanged_max_abs_diff"] == 0.0
        numbers.update(merge)
    only_rank_0_wrote(run)
    record(f"zero{stage}/{model}/combined", **numbers)


@needs_gloo
@needs_deepspeed
def test_zero3_partitions_saves_and_merges(tmp_path, one_process):
    check_zero(tmp_path, one_process, 3, "bert")


@needs_gloo
@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage,model", [(2, "bert"), (2, "llama"), (3, "llama")])
def test_zero_more(tmp_path, one_process, stage, model):
    check_zero(tmp_path, one_process, stage, model)


@needs_gloo
@needs_deepspeed
@pytest.mark.slow
def test_accelerate_launch_with_the_example_zero3_config(tmp_path, one_process):
    """`accelerate launch --config_file examples/distributed/accelerate_zero3.yaml` (DeepSpeed config from the
    example JSON, no backend in TrainingArguments) trains, saves and merges like `Trainer(deepspeed=...)`."""
    run = tmp_path / "accelerate_zero3"
    config = Path(__file__).parents[1] / "examples" / "distributed" / "accelerate_zero3.yaml"
    seconds = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(SCRIPT),
                      str(run), "--backend", "launcher", "--merge-check"], run.with_suffix(".log"))
    info = run_info(run)
    assert info["deepspeed"] and info["world_size"] == 2 and info["values_local_numel"] < info["values_numel"]
    diff = same_adapter(one_process("bert", "combined") / "adapter", run / "adapter")
    merge = json.loads((run / "merge.json").read_text())
    assert merge["adapter_effect_max_abs"] > 1e-3 and merge["merged_max_abs_diff"] <= 1e-5
    only_rank_0_wrote(run)
    record("accelerate_launch_zero3/bert/combined", max_abs_diff_vs_one_process=diff,
           max_abs_diff_reloaded_logits=reload_difference(run, "bert"), launch_seconds=round(seconds, 1))


# ----------------------------------------------------------------------------- DDP and gradient accumulation


@needs_gloo
def test_ddp_trains_the_same_adapter_as_one_process(tmp_path, one_process):
    run = tmp_path / "ddp"
    seconds = train(run, backend="ddp")
    assert run_info(run)["wrapper"] == "DistributedDataParallel"
    diff = same_adapter(one_process("bert", "combined") / "adapter", run / "adapter")
    only_rank_0_wrote(run)
    record("ddp/bert/combined", max_abs_diff_vs_one_process=diff, launch_seconds=round(seconds, 1))


@pytest.mark.parametrize("model", ["bert", pytest.param("llama", marks=pytest.mark.slow)])
def test_gradient_accumulation_equals_one_large_batch(one_process, model):
    """4 micro-batches of 2 per optimizer step train the adapter that batches of 8 train."""
    diff = same_adapter(one_process(model, "combined") / "adapter",
                        one_process(model, "combined", "--grad-accum", "4") / "adapter")
    record(f"grad_accum_4x2/{model}/combined", max_abs_diff_vs_batch_of_8=diff)


@needs_gloo
@pytest.mark.slow
def test_gradient_accumulation_under_ddp(tmp_path, one_process):
    run = tmp_path / "ddp_accum"
    train(run, "--grad-accum", "2", backend="ddp")
    diff = same_adapter(one_process("bert", "combined") / "adapter", run / "adapter")
    record("ddp_grad_accum_2x2x2/bert/combined", max_abs_diff_vs_one_process=diff)


# ----------------------------------------------------------------------------- the watchdog itself

ESCAPING_CHILD = ("import os, subprocess, sys, time; "
                  "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)']); ")


def test_watchdog_kills_a_hung_launch_and_its_escaped_children(tmp_path):
    """A launch that hangs (with a child in its own session, as torchrun's workers are) fails and leaves nothing."""
    before = set(Path("/proc").iterdir())
    with pytest.raises(pytest.fail.Exception, match="timed out"):
        launch([sys.executable, "-c", ESCAPING_CHILD + "time.sleep(300)"], tmp_path / "hang.log", timeout=3)
    time.sleep(0.2)
    assert not [p for p in set(Path("/proc").iterdir()) - before
                if p.name.isdigit() and b"time.sleep(300)" in _cmdline(p)]


def test_launch_fails_when_a_process_outlives_it(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="outlived"):
        launch([sys.executable, "-c", ESCAPING_CHILD + "time.sleep(1)"], tmp_path / "orphan.log", timeout=60)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


# ----------------------------------------------------------------------------- saving from any state dict


def test_a_state_dict_not_built_by_state_dict_saves_the_same_adapter():
    """DeepSpeed ZeRO-3 hands PEFT a state dict collected parameter by parameter, with a discrete mask's raw int32
    positions: the saved entries must still be the coded index one-process saves write."""
    from dist_train import config
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(base_model("bert"), config("bert", "combined"))
    raw = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert any(v.dtype == torch.int32 and k.endswith("lora_A.index") for k, v in raw.items())
    expected, got = get_peft_model_state_dict(model), get_peft_model_state_dict(model, state_dict=raw)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]) and got[key].dtype == expected[key].dtype, key


def test_merge_that_would_add_a_parameter_is_refused_under_zero3():
    """Llama's projections have no bias: merging a BitFit part creates one, which ZeRO-3 would not partition. With the
    weights marked as ZeRO-3 parameters (`ds_id`, as DeepSpeed marks them), the merge is refused before any change."""
    from dist_train import config
    from peft import get_peft_model

    model = get_peft_model(base_model("llama"), config("llama", "combined"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        if "base_layer" in name:
            param.ds_id = 0
    with pytest.raises(ValueError, match="under DeepSpeed ZeRO-3"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="under DeepSpeed ZeRO-3"):
        model.merge_and_unload()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------------- README agrees with the results file

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "distributed" / "results.json"


def test_readme_scaling_out_cites_the_results_file():
    """Every difference README "Scaling out" cites is the maximum of the committed results for what it names."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = " ".join(readme.split("### Scaling out", 1)[1].split("\n## ", 1)[0].split())
    cases = json.loads(RESULTS.read_text())["cases"]

    def worst(prefixes: tuple[str, ...], field: str = "max_abs_diff_vs_one_process") -> str:
        found = [v[f] for k, v in cases.items() if k.startswith(prefixes) for f in v if f.startswith(field)]
        assert found, prefixes
        return f"{max(found):.1e}"

    expected = [f"{worst(('fsdp2/',))} under FSDP2", f"{worst(('zero3/', 'accelerate_launch_zero3/'))} under ZeRO-3",
                f"{worst(('zero2/',))} under ZeRO-2", f"{worst(('ddp/',))} under DDP",
                f"{worst(('grad_accum_', 'ddp_grad_accum_'), 'max_abs_diff_vs')} for gradient accumulation",
                f"logits by {worst(('zero3/bert/', 'accelerate_launch_zero3/'), 'merged_max_abs_diff')}"]
    for phrase in expected:
        assert phrase in section, phrase
    assert all(v.get(f, 0.0) == 0.0 for v in cases.values()
               for f in ("max_abs_diff_reloaded_logits", "max_abs_diff_resumed_vs_uninterrupted"))  # "bit-identical"
    assert all(v["launch_seconds"] <= 30 for v in cases.values() if "launch_seconds" in v)  # "15-30 s"
