"""Train a tiny APET model with the HF `Trainer`, alone or under `torchrun` (CPU, gloo): DDP, FSDP2 or DeepSpeed ZeRO.

One script for every distributed test (`test_distributed.py`). Every launch of it with the same `--global-batch`
sees the same global batches in the same order, with dropout off, so all backends should train the same adapter:

    python tests/dist_train.py OUT --model bert --adapter combined
    torchrun --standalone --nproc_per_node 2 tests/dist_train.py OUT --backend fsdp2 --model llama --adapter delta

What it writes under OUT:
- `adapter/`: the trained adapter, saved by `Trainer.save_model` (a whole adapter folder, written by rank 0);
- `logits.pt`: the trained model's logits on a fixed evaluation batch (computed through the wrapped model);
- `writes.txt`: one line with the writing rank per adapter file written (only rank 0 may write);
- with `--resume-at S`: `trainer/checkpoint-S/` (sharded under FSDP with `SHARDED_STATE_DICT`, a DeepSpeed
  checkpoint under ZeRO) and `resumed/`, the adapter of a second `Trainer` on a freshly built model that resumes
  from that checkpoint and trains to the same step;
- with `--merge-check` (ZeRO-3): `merge.json`, logits before and after `merge_adapter()` on the partitioned model.

Teardown: gloo's `destroy_process_group()` (or Python's own finalisation of a live gloo group) once deadlocked
(`ProcessGroupGloo`'s destructor joining its thread while that thread waits for the GIL). Here no rank tears gloo
down: each rank marks itself done in torchrun's key-value store (hosted by the torchrun agent, not by a rank), waits
until every rank has, then flushes its output and leaves with `os._exit(0)`. By then every rank has returned from
its last collective, so no gloo message is still owed to anyone, and the files were closed by the code that wrote
them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from conftest import VOCAB, tiny_bert, tiny_llama  # noqa: E402

# FSDP1 (deprecated by transformers) is left out: on CPU its full-state-dict save crashes (see README).
# "launcher": no backend in TrainingArguments; `accelerate launch --config_file ...` chose it (FSDP or DeepSpeed).
BACKENDS = ("none", "ddp", "fsdp2", "zero2", "zero3", "launcher")
ADAPTERS = ("delta", "lora", "combined")
LENGTH = 8


def dataset(model: str, size: int = 32):
    """Fixed random token ids; BERT learns a label (first id in the upper half), Llama the sequence itself."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (size, LENGTH), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long().tolist() if model == "bert" else ids.tolist()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * LENGTH] * size,
                                       "labels": labels})


def eval_batch() -> dict[str, torch.Tensor]:
    """The batch whose logits every run records (not part of the training data)."""
    ids = torch.randint(3, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def base_model(model: str) -> nn.Module:
    """The tiny base model (fixed seed), with every dropout off: each rank would draw different masks."""
    base = tiny_bert() if model == "bert" else tiny_llama()
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if model == "bert":
        # The Trainer divides the loss by the accumulation steps only for models that do not take loss kwargs
        # (`**kwargs` in forward, as every transformers 5 model has); sequence classification ignores them and
        # averages over its micro-batch, so N accumulated micro-batches would give N times the gradient.
        base.accepts_loss_kwargs = False
    return base


def config(model: str, adapter: str):
    """`delta`: a discrete (scattered) delta; `lora`: LoRA with discrete masks on A and B; `combined`: masked LoRA
    + BitFit + an adjacent (block) delta. One adapter holds one part per operation, hence two delta adapters."""
    from peft_apet import APETConfig

    task = "SEQ_CLS" if model == "bert" else "CAUSAL_LM"
    attention = ["query", "value"] if model == "bert" else ["q_proj", "v_proj"]
    ffn = ["intermediate.dense"] if model == "bert" else ["up_proj"]
    if adapter == "delta":
        return APETConfig.delta(mask="discrete", target_modules=attention + ffn, num_trainable_params=600,
                                task_type=task)
    if adapter == "lora":
        return APETConfig.lora(mask="discrete", target_modules=attention, num_trainable_params=500, task_type=task)
    return APETConfig.combine(APETConfig.lora(mask="discrete", target_modules=attention), APETConfig.bitfit(),
                              APETConfig.delta(mask="adjacent", target_modules=ffn), num_trainable_params=700,
                              task_type=task)


def record_adapter_writes(out: Path) -> None:
    """Wrap the safetensors writer PEFT uses so that every write is logged with the writing rank."""
    import peft.peft_model

    save = peft.peft_model.safe_save_file
    rank = os.environ.get("RANK", "0")

    def logged_save(*args, **kwargs):
        with open(out / "writes.txt", "a") as f:
            f.write(f"{rank}\n")
        return save(*args, **kwargs)

    peft.peft_model.safe_save_file = logged_save


def backend_arguments(backend: str, model: str) -> dict:
    """`TrainingArguments` fields that select the backend; DeepSpeed's batch sizes and optimizer stay "auto"."""
    if backend.startswith("fsdp"):
        layer = "BertLayer" if model == "bert" else "LlamaDecoderLayer"
        fsdp_config = {"version": int(backend[-1]), "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                       "transformer_layer_cls_to_wrap": [layer], "state_dict_type": "SHARDED_STATE_DICT"}
        return {"fsdp": True, "fsdp_config": fsdp_config}
    if backend.startswith("zero"):
        # Every batch-size field "auto": the Trainer fills them from TrainingArguments, so they cannot disagree.
        # No "optimizer": the Trainer's torch AdamW is used (ZeRO wraps a client optimizer).
        return {"deepspeed": {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": int(backend[-1]),
                                                    "stage3_gather_16bit_weights_on_model_save": True,
                                                    # partition every tensor, however small (default: < 1e5 stay)
                                                    "stage3_param_persistence_threshold": 0}}}
    return {}


def open_cpu_fsdp_gate() -> None:
    """Let accelerate shard with FSDP on CPU (gloo), as it does on GPUs.

    accelerate (1.15) switches to FSDP only for accelerator devices: on CPU (`MULTI_CPU`) it ignores the FSDP plugin
    the Trainer hands it and trains with plain DDP, without a word. This opens that one gate, so that everything
    after it (wrapping with `fully_shard` / `FullyShardedDataParallel`, sharded checkpoints, resuming, gathering the
    state dict) runs on CPU as it runs on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's init ends

    AcceleratorState.__init__ = init_with_cpu_fsdp


def open_cpu_deepspeed_gate() -> None:
    """Let accelerate run DeepSpeed over gloo on CPU (DS_ACCELERATOR=cpu).

    accelerate (1.15) turns DeepSpeed off under `use_cpu=True`; without it, on a machine with no accelerator, it
    finds no backend and counts one process (so the Trainer's batch sizes disagree with DeepSpeed's world size:
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size"). This gives it the gloo
    backend there; DeepSpeed's own `init_distributed`, engine, ZeRO partitioning and checkpoints then run as usual."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    prepare = PartialState._prepare_backend

    def prepare_with_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = prepare(self, cpu, sagemaker_dp, backend)
        if chosen is None and not cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    PartialState._prepare_backend = prepare_with_gloo
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use (168 s of C++ here). Only
    # `inference_all_reduce` (tensor-parallel inference) uses it; training collectives go through torch.distributed.
    # (`deepspeed.comm.torch` as an attribute is torch itself: deepspeed.comm imports torch.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def make_trainer(args: argparse.Namespace, output_dir: Path, save_steps: int = 0):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = args.global_batch // (world_size * args.grad_accum)
    assert per_device * world_size * args.grad_accum == args.global_batch, "global batch must divide evenly"
    training = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.steps, learning_rate=1e-2, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum, lr_scheduler_type="constant", weight_decay=0.0,
        # AdamW divides by sqrt(v) + eps: with the default eps 1e-8, an entry whose gradient is ~1e-8 moves by up to
        # lr whatever the sign of its rounding noise (ranks sum gradients in another order); 1e-6 keeps such
        # updates proportional to the gradient, so runs that differ only in summation order agree to ~1e-7.
        adam_epsilon=1e-6,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=1, report_to=[],
        seed=0, data_seed=0,
        # accelerate turns DeepSpeed off under use_cpu=True; DeepSpeed picks its CPU accelerator (DS_ACCELERATOR=cpu).
        use_cpu=not (args.backend in ("zero2", "zero3") or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"),
        disable_tqdm=True, dataloader_num_workers=0,
        # Losses that do not count tokens (sequence classification) would otherwise be scaled by the world size.
        average_tokens_across_devices=False, **backend_arguments(args.backend, args.model))
    model = get_peft_model(base_model(args.model), config(args.model, args.adapter))
    return Trainer(model=model, args=training, train_dataset=dataset(args.model))


def logits(trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward through the wrapped model on every rank (FSDP and ZeRO-3 gather inside), eval mode, no grad."""
    wrapped = trainer.model_wrapped
    wrapped.eval()
    with torch.no_grad():
        return wrapped(**batch).logits.float().cpu()


def describe(trainer) -> dict:
    """What the Trainer actually did: which wrapper, and whether the adapter's values were sharded."""
    values = [p for n, p in trainer.model_wrapped.named_parameters() if n.endswith(".values")]
    return {"world_size": trainer.args.world_size, "fsdp": trainer.is_fsdp_enabled,
            "deepspeed": trainer.is_deepspeed_enabled, "wrapper": type(trainer.model_wrapped).__name__,
            "values_types": sorted({type(p).__name__ for p in values}),
            # index buffers are never sharded: each rank holds all of them (compare with a one-process run)
            "index_numel": sum(b.numel() for n, b in trainer.model_wrapped.named_buffers() if n.endswith(".index")),
            "values_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in values),
            # this rank's share: FSDP2 shards are DTensors; ZeRO-3 keeps a partition in `ds_tensor`
            "values_local_numel": sum(p.to_local().numel() if hasattr(p, "to_local")
                                      else p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                      for p in values)}


def merge_check(trainer, batch: dict[str, torch.Tensor]) -> dict:
    """ZeRO-3: merge the adapter into the partitioned base weights and compare logits before and after.

    `merge_adapter()` writes into the base weights, so it runs inside `GatheredParameters(..., modifier_rank=0)`:
    every rank sees whole tensors, and rank 0's merged weights are partitioned again on exit. A merge APET refuses
    under ZeRO-3 (one that would add a parameter) is recorded with the logits after it, which must be unchanged."""
    import deepspeed

    before = logits(trainer, batch)
    peft_model = trainer.model
    with peft_model.disable_adapter():
        base = logits(trainer, batch)
    try:
        with deepspeed.zero.GatheredParameters(list(peft_model.parameters()), modifier_rank=0):
            peft_model.merge_adapter()
    except ValueError as refusal:  # a merge that would add a parameter (a bias on a bias-free layer)
        return {"refused": str(refusal), "unchanged_max_abs_diff": (logits(trainer, batch) - before).abs().max().item(),
                "adapter_effect_max_abs": (before - base).abs().max().item()}
    merged = logits(trainer, batch)
    with deepspeed.zero.GatheredParameters(list(peft_model.parameters()), modifier_rank=0):
        peft_model.unmerge_adapter()
    unmerged = logits(trainer, batch)
    return {"merged_max_abs_diff": (merged - before).abs().max().item(),
            "unmerged_max_abs_diff": (unmerged - before).abs().max().item(),
            "adapter_effect_max_abs": (before - base).abs().max().item()}


def finish(exit_code: int = 0) -> None:
    """Leave without tearing gloo down (see the module docstring); a single process just returns."""
    if not torch.distributed.is_initialized():
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = torch.distributed.PrefixStore("apet_finish/", _get_default_store())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    store.set(str(rank), "done")
    store.wait([str(r) for r in range(world)], timedelta(seconds=120))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def main(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record_adapter_writes(out)
    if args.backend in ("fsdp2", "launcher") and not args.keep_cpu_gate:
        open_cpu_fsdp_gate()
    if args.backend in ("zero2", "zero3", "launcher") and not args.keep_cpu_gate:
        open_cpu_deepspeed_gate()
    trainer = make_trainer(args, out / "trainer", save_steps=args.resume_at)
    trainer.train()
    run = describe(trainer)  # before any forward: afterwards FSDP2 keeps the root's parameters unsharded
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final adapter is gathered into one folder
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "adapter"))
    batch = eval_batch()
    trained = logits(trainer, batch)
    merge = merge_check(trainer, batch) if args.merge_check else None
    if trainer.args.should_save:
        torch.save(trained, out / "logits.pt")
        (out / "run.json").write_text(json.dumps(run, indent=1))
        if merge is not None:
            (out / "merge.json").write_text(json.dumps(merge, indent=1))
    if args.resume_at:
        resumed = make_trainer(args, out / "trainer_resumed")
        resumed.train(resume_from_checkpoint=str(out / "trainer" / f"checkpoint-{args.resume_at}"))
        if resumed.is_fsdp_enabled:
            resumed.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        resumed.save_model(str(out / "resumed"))
    finish()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", choices=BACKENDS, default="none")
    parser.add_argument("--model", choices=("bert", "llama"), default="bert")
    parser.add_argument("--adapter", choices=ADAPTERS, default="combined")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume-at", type=int, default=0, help="checkpoint at this step, then resume from it")
    parser.add_argument("--keep-cpu-gate", action="store_true",
                        help="fsdp: do not open accelerate's CPU gate (the Trainer then falls back to DDP)")
    parser.add_argument("--merge-check", action="store_true", help="ZeRO-3: merge and unmerge on the sharded model")
    args = parser.parse_args(argv)
    if args.backend != "none" and "WORLD_SIZE" not in os.environ:
        parser.error(f"--backend {args.backend} needs torchrun")
    return args


if __name__ == "__main__":
    arguments = parse()
    try:
        main(arguments)
    except BaseException:
        if not torch.distributed.is_initialized():
            raise
        # Failing: say why and go, without Python's teardown of a live gloo group (torchrun stops the other ranks).
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
