"""A refused `PeftModel.from_pretrained` leaves the base model as it was.

When `from_pretrained` reads the config from the adapter folder, `peft_apet.checks.check_checkpoint_fits_plan`
refuses a checkpoint that does not fit before any module is replaced. With `config=` given, PEFT injects the
(empty) adapter first and only then reads the weights, so a checkpoint that `check_state_fits_model` refuses would
leave empty APET layers (and frozen parameters) in the caller's model. `install_from_pretrained_hook` wraps
`PeftModel.from_pretrained`: if loading an APET adapter raises, the model's module tree, the `requires_grad` flags
of its parameters and its attributes are put back as they were before the call, then the error propagates.
"""

from __future__ import annotations

import functools
from typing import Any

from peft import PeftModel
from torch import nn

from .config import APETConfig
from .layer import APETLayer


def _snapshot(model: nn.Module) -> tuple[list[tuple[nn.Module, dict]], dict, set[str], bool]:
    """Every module's children dict (a copy), every parameter's `requires_grad`, the model's attribute names, and
    whether it holds APET layers already."""
    modules = [(m, dict(m._modules)) for m in model.modules()]
    flags = {p: p.requires_grad for p in model.parameters()}
    had_apet = any(isinstance(m, APETLayer) for m in model.modules())
    return modules, flags, set(model.__dict__), had_apet


def _restore(model: nn.Module, snapshot: tuple[list[tuple[nn.Module, dict]], dict, set[str], bool]) -> None:
    modules, flags, attributes, _ = snapshot
    for module, children in modules:
        module._modules.clear()
        module._modules.update(children)
    for param, requires_grad in flags.items():
        param.requires_grad_(requires_grad)
    for name in set(model.__dict__) - attributes:  # e.g. the `peft_config` PEFT sets on the model
        delattr(model, name)


def install_from_pretrained_hook() -> None:
    """Wrap `PeftModel.from_pretrained` so that a refused APET load leaves `model` unchanged (idempotent)."""
    original = PeftModel.__dict__["from_pretrained"].__func__
    if getattr(original, "_apet_hook", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> PeftModel:
        snapshot = _snapshot(model)
        try:
            return original(cls, model, model_id, *args, **kwargs)
        except Exception:
            config = kwargs.get("config", args[2] if len(args) > 2 else None)
            added_apet = any(isinstance(m, APETLayer) for m in model.modules()) and not snapshot[3]
            if isinstance(config, APETConfig) or added_apet:  # other methods keep PEFT's behaviour
                _restore(model, snapshot)
            raise

    from_pretrained._apet_hook = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
