"""Registering the "APET" type with PEFT, so `get_peft_model`, `PeftModel.from_pretrained` and friends know it.

PEFT only accepts members of its own `PeftType` enum in `register_peft_method`, so APET writes the same three
mappings that function writes, keyed by `APETPeftType.APET`: a `str` enum member that hashes and compares like
the string "APET" read back from `adapter_config.json`. Running it twice is harmless.
"""

from __future__ import annotations

from peft import mapping

from .config import APETConfig, APETPeftType
from .loading import install_from_pretrained_hook
from .model import APETModel
from .model_card import install_model_card_hook


def register_apet() -> None:
    """Make PEFT aware of the APET tuner, and make its model cards describe APET adapters (idempotent)."""
    key = APETPeftType.APET
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = APETConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = APETModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = APETModel.prefix
    install_model_card_hook()
    install_from_pretrained_hook()


def is_registered() -> bool:
    """Whether PEFT resolves "APET" to this package's classes."""
    return mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get("APET") is APETConfig
