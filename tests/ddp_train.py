"""Train a tiny APET BERT with the HF `Trainer` and save the adapter; run alone or under `torchrun` (CPU, gloo).

Used by `test_distributed.py`: `python ddp_train.py OUT GLOBAL_BATCH` and
`torchrun --standalone --nproc_per_node 2 ddp_train.py OUT GLOBAL_BATCH` see the same global batches, so they
should produce the same adapter. Every rank appends its rank to `OUT/writes.txt` whenever it writes an adapter
file, so the test can check that only rank 0 writes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from conftest import VOCAB, tiny_bert  # noqa: E402

STEPS = 4


def dataset(size: int = 32, length: int = 8):
    """Fixed random token ids with a learnable label (first id in the upper half of the vocabulary)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (size, length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * size,
                                       "labels": (ids[:, 0] > VOCAB // 2).long().tolist()})


def config():
    from peft_apet import APETConfig

    return APETConfig.combine(APETConfig.lora(mask="discrete"), APETConfig.bitfit(),
                              APETConfig.delta(mask="adjacent"), num_trainable_params=700, task_type="SEQ_CLS")


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


def main(out: Path, global_batch: int) -> None:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    out.mkdir(parents=True, exist_ok=True)
    record_adapter_writes(out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = get_peft_model(tiny_bert(), config())
    for module in model.modules():  # dropout would draw different masks on each rank
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=STEPS, learning_rate=1e-2,
                             per_device_train_batch_size=global_batch // world_size, lr_scheduler_type="constant",
                             save_strategy="no", logging_steps=1, report_to=[], seed=0, data_seed=0, use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0,
                             average_tokens_across_devices=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    if torch.distributed.is_initialized():
        # Without an orderly shutdown a rank that exits while another still holds gloo threads can abort
        # ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
