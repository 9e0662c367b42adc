"""The operations of APET and the facts about each of them that the rest of the package reads.

A leaf of the package.
"""

from __future__ import annotations

# Tensors each operation owns, in allocation order. For two-matrix parts the zero-initialised matrix comes
# last; see `_split_within_module`.
OPERATION_ROLES = {
    "delta": ("delta",),
    "bias": ("bias",),
    "lora": ("lora_A", "lora_B"),
    "adapter": ("adapter_down", "adapter_up"),
    "prompt": ("prompt",),
}
