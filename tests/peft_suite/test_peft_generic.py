"""PEFT's own generic test suite (`tests/test_custom_models.py` of the installed PEFT's sdist) run on APET.

PEFT's code is not in this repository: `tests/peft_suite/fetch_peft_tests.py` (called by `.ci/run`) downloads the
sdist of the installed PEFT into `.peft-sdist/`. This module imports PEFT's `TestPeftCustomModel` and re-runs the
bodies of its tests that are parametrised over PEFT's `TEST_CASES`, with `APET_CASES` instead: lora, masked lora,
adjacent/discrete deltas, bitfit (on linears, Conv1D and LayerNorm), adapters and combined parts, on PEFT's `MLP`,
`MLP_LayerNorm` and `EmbConv1D` (transformers `Conv1D`) models. PEFT's tests that are written for one PEFT method
(LoRA's `add_weighted_adapter`, trainable tokens, ...) are not collected. Cases that do not apply to APET are
marked in `EXPECTED_FAILURES` / `SKIPS` (see `conftest.py`) with the reason.

Run alone: `python tests/peft_suite/fetch_peft_tests.py && python -m pytest -q tests/peft_suite`.
Without the sdist the module skips, except in CI (`CI` set), where it fails.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

from peft_apet import APETConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_peft_tests import tests_dir  # noqa: E402

UPSTREAM_DIR = tests_dir()
CASE_ARGS = "test_name, model_id, config_cls, config_kwargs"


def _load_upstream() -> types.ModuleType:
    """Import PEFT's `test_custom_models` as the package `peft_upstream_tests` (its imports are relative)."""
    # testing_common imports diffusers' StableDiffusionPipeline for its Stable Diffusion tests only (isinstance
    # checks on the object under test); diffusers is not a dependency here. A class no object is an instance of
    # keeps those checks False for our models, as they would be with diffusers installed.
    if "diffusers" not in sys.modules:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            shim = types.ModuleType("diffusers")
            shim.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
            sys.modules["diffusers"] = shim
    spec = importlib.machinery.ModuleSpec("peft_upstream_tests", None, is_package=True)
    spec.submodule_search_locations = [str(UPSTREAM_DIR)]
    sys.modules["peft_upstream_tests"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("peft_upstream_tests.test_custom_models")


if not (UPSTREAM_DIR / "test_custom_models.py").is_file():
    message = (f"PEFT's test suite is not at {UPSTREAM_DIR}; fetch it with "
               "`python tests/peft_suite/fetch_peft_tests.py` (.ci/run does).")
    if os.environ.get("CI"):
        raise RuntimeError(message + " In CI this is a failure, not a skip.")
    pytest.skip(message, allow_module_level=True)

upstream = _load_upstream()


def _part(operation: str, **kwargs) -> dict:
    return {"operation": operation, **kwargs}


# (test id, PEFT's model id, APETConfig kwargs). Budgets are small enough to mask, large enough that every
# masked tensor keeps an entry.
APET_CASES = [
    ("MLP lora lin0", "MLP", {"parts": [_part("lora", target_modules=["lin0"])]}),
    ("MLP lora lin0 lin1", "MLP", {"parts": [_part("lora", target_modules=["lin0", "lin1"], r=4, lora_alpha=8.0)]}),
    ("MLP lora modules_to_save", "MLP",
     {"parts": [_part("lora", target_modules=["lin0"])], "modules_to_save": ["lin1"]}),
    ("MLP lora dropout", "MLP", {"parts": [_part("lora", target_modules=["lin0", "lin1"], lora_dropout=0.1)]}),
    ("MLP masked lora discrete", "MLP",
     {"parts": [_part("lora", target_modules=["lin0", "lin1"], mask="discrete", num_trainable_params=60)]}),
    ("MLP masked lora adjacent", "MLP",
     {"parts": [_part("lora", target_modules=["lin0", "lin1"], mask="adjacent", density=0.5)]}),
    ("MLP delta discrete", "MLP",
     {"parts": [_part("delta", target_modules=["lin0", "lin1"], mask="discrete", num_trainable_params=50)]}),
    ("MLP delta adjacent rows", "MLP",
     {"parts": [_part("delta", target_modules=["lin0", "lin1"], mask="adjacent", num_trainable_params=50)]}),
    ("MLP delta adjacent columns", "MLP",
     {"parts": [_part("delta", target_modules=["lin0"], mask="adjacent", mask_axis=1, density=0.3)]}),
    ("MLP delta dense", "MLP", {"parts": [_part("delta", target_modules=["lin1"])]}),
    ("MLP bitfit", "MLP", {"parts": [_part("bias", target_modules=["lin0", "lin1"])]}),
    ("MLP bitfit discrete", "MLP",
     {"parts": [_part("bias", target_modules=["lin0", "lin1"], mask="discrete", num_trainable_params=7)]}),
    ("MLP adapter", "MLP", {"parts": [_part("adapter", target_modules=["lin0"], bottleneck=4)]}),
    ("MLP adapter masked", "MLP",
     {"parts": [_part("adapter", target_modules=["lin0"], bottleneck=4, mask="discrete", num_trainable_params=30)]}),
    ("MLP combine lora bias delta", "MLP",
     {"parts": [_part("lora", target_modules=["lin0"], mask="adjacent"), _part("bias", target_modules=["lin1"]),
                _part("delta", target_modules=["lin1"], mask="discrete")], "num_trainable_params": 80}),
    ("MLP_LayerNorm lora", "MLP_LayerNorm", {"parts": [_part("lora", target_modules=["lin0", "lin1"])]}),
    ("MLP_LayerNorm bitfit layernorm", "MLP_LayerNorm",
     {"parts": [_part("bias", target_modules=["layernorm0", "layernorm1"])]}),
    ("MLP_LayerNorm adapter layernorm", "MLP_LayerNorm",
     {"parts": [_part("adapter", target_modules=["layernorm0"], bottleneck=4)]}),
    ("EmbConv1D lora conv1d", "EmbConv1D", {"parts": [_part("lora", target_modules=["conv1d"])]}),
    ("EmbConv1D delta discrete conv1d", "EmbConv1D",
     {"parts": [_part("delta", target_modules=["conv1d"], mask="discrete", num_trainable_params=3)]}),
    ("EmbConv1D bitfit conv1d lin0", "EmbConv1D", {"parts": [_part("bias", target_modules=["conv1d", "lin0"])]}),
    ("EmbConv1D combine", "EmbConv1D",
     {"parts": [_part("lora", target_modules=["conv1d"]), _part("delta", target_modules=["lin0"], mask="discrete",
                                                                   num_trainable_params=8)]}),
]


def _is_case_parametrize(mark) -> bool:
    return mark.name == "parametrize" and mark.args and mark.args[0].replace(" ", "") == CASE_ARGS.replace(" ", "")


def _apet_cases() -> list:
    return [pytest.param(name, model_id, APETConfig, kwargs, id=name) for name, model_id, kwargs in APET_CASES]


def _suite_class() -> type:
    """A subclass of PEFT's `TestPeftCustomModel` whose case-parametrised tests run over `APET_CASES`; its other
    tests (written for one PEFT method) are switched off."""
    base = upstream.TestPeftCustomModel
    attributes = {"__doc__": "PEFT's TestPeftCustomModel over APET cases.", "__module__": __name__}
    for name in dir(base):
        if not name.startswith("test_"):
            continue
        func = getattr(base, name)
        marks = list(getattr(func, "pytestmark", []))
        if not any(_is_case_parametrize(m) for m in marks):
            attributes[name] = None  # not a test: pytest collects callables only
            continue
        copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
        copy.__dict__.update(func.__dict__)
        copy.__kwdefaults__ = func.__kwdefaults__
        copy.__qualname__ = f"TestAPETOnPeftSuite.{name}"
        copy.pytestmark = [m for m in marks if not _is_case_parametrize(m)] + [
            pytest.mark.parametrize(CASE_ARGS, _apet_cases()).mark]
        attributes[name] = copy
    return type("TestAPETOnPeftSuite", (base,), attributes)


TestAPETOnPeftSuite = _suite_class()
