"""A refused `PeftModel.from_pretrained` or `load_adapter` leaves the model as it was.

When `from_pretrained` or `load_adapter` reads the config from the adapter folder, the tuner plans the adapter and
`peft_apet.checks.check_checkpoint_fits_plan` refuses a checkpoint that does not fit before any module is replaced:
`install_from_pretrained_hook` wraps both so that, while they inject that adapter, `adapter_folder_being_loaded()`
names the folder (PEFT passes the tuner only the config). With `config=` given, PEFT injects the (empty) adapter
first and only then reads the weights, so a checkpoint that `check_state_fits_model` refuses would leave empty APET
layers (and frozen parameters) in the caller's model: if loading an APET adapter raises, the wrapped
`from_pretrained` puts the model's module tree, the `requires_grad` flags of its parameters and its attributes back
as they were before the call, then the error propagates. A `load_adapter` of a new APET adapter that fails after
PEFT injected it (a Hub id, whose files are not read before; a checkpoint missing a head of `modules_to_save`)
deletes that adapter again and restores the `requires_grad` flags, so a later `save_pretrained` cannot write it.
"""

from __future__ import annotations

import functools
import os
from contextvars import ContextVar
from typing import Any

from peft import PeftModel
from torch import nn

from .config import APETConfig
from .layer import APETLayer

_FOLDER: ContextVar[str | None] = ContextVar("peft_apet_adapter_folder", default=None)
# True while transformers' own `load_adapter` runs: it reads adapter weights itself, past PEFT's loader, so it would
# never unpack (or check) an APET file; the tuner refuses to inject then (`check_not_loaded_by_transformers`).
_TRANSFORMERS_LOADING: ContextVar[bool] = ContextVar("peft_apet_transformers_loading", default=False)


def check_not_loaded_by_transformers() -> None:
    """Raise ValueError inside transformers' `model.load_adapter`, before an APET adapter is injected."""
    if _TRANSFORMERS_LOADING.get():
        raise ValueError(
            "transformers' `model.load_adapter(...)` (also used by `AutoModel*.from_pretrained` on an adapter folder) "
            "loads adapter weights without PEFT's loader, so it cannot read APET's packed weights and would leave the "
            "adapter at its initial values. Load APET adapters with PEFT: `PeftModel.from_pretrained(model, folder)` "
            "(or `peft_model.load_adapter(folder, adapter_name=...)`). Nothing was changed."
        )


def adapter_folder_being_loaded() -> str | None:
    """The local folder whose adapter `PeftModel.from_pretrained` / `load_adapter` is injecting now, having read its
    config from there; None otherwise (e.g. `get_peft_model`, or `from_pretrained` given `config=`)."""
    return _FOLDER.get()


def _folder(model_id: Any, subfolder: str | None) -> str | None:
    folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    return folder if os.path.isdir(folder) else None


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


def _remove_failed_adapter(model: PeftModel, adapter_name: str, flags: dict[nn.Parameter, bool]) -> None:
    """Take out what a failed `load_adapter` of the new adapter `adapter_name` injected (its layers' tensors, its
    config, a `modules_to_save` copy), and put back the `requires_grad` flags of the parameters from before."""
    active = model.active_adapters
    model.delete_adapter(adapter_name)
    for param, requires_grad in flags.items():
        param.requires_grad_(requires_grad)
    if model.active_adapters != active:
        model.set_adapter(active if len(active) > 1 else active[0])


def install_from_pretrained_hook() -> None:
    """Wrap `PeftModel.from_pretrained` so that a refused APET load leaves `model` unchanged, and it and
    `PeftModel.load_adapter` so that the tuner knows the folder it loads (idempotent)."""
    original = PeftModel.__dict__["from_pretrained"].__func__
    if getattr(original, "_apet_hook", False):
        return
    original_load_adapter = PeftModel.load_adapter

    @functools.wraps(original)
    def from_pretrained(cls, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> PeftModel:
        snapshot = _snapshot(model)
        config = kwargs.get("config", args[2] if len(args) > 2 else None)
        token = _FOLDER.set(_folder(model_id, kwargs.get("subfolder")) if config is None else None)
        try:
            return original(cls, model, model_id, *args, **kwargs)
        except Exception:
            added_apet = any(isinstance(m, APETLayer) for m in model.modules()) and not snapshot[3]
            if isinstance(config, APETConfig) or added_apet:  # other methods keep PEFT's behaviour
                _restore(model, snapshot)
            raise
        finally:
            _FOLDER.reset(token)

    @functools.wraps(original_load_adapter)
    def load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        new = adapter_name not in self.peft_config  # PEFT then reads the config from the folder and injects it
        flags = {p: p.requires_grad for p in self.parameters()} if new else {}
        token = _FOLDER.set(_folder(model_id, kwargs.get("subfolder")) if new else None)
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except Exception:
            if new and adapter_name in self.peft_config and isinstance(self.peft_config[adapter_name], APETConfig):
                _remove_failed_adapter(self, adapter_name, flags)
            raise
        finally:
            _FOLDER.reset(token)

    from_pretrained._apet_hook = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    _install_transformers_load_adapter_hook()


def _install_transformers_load_adapter_hook() -> None:
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter

    @functools.wraps(original)
    def load_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        token = _TRANSFORMERS_LOADING.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _TRANSFORMERS_LOADING.reset(token)

    PeftAdapterMixin.load_adapter = load_adapter
