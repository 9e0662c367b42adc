"""PEFT's own generic test suite (`tests/test_custom_models.py` of the installed PEFT's sdist) run on APET.

PEFT's code is not in this repository: `tests/peft_suite/fetch_peft_tests.py` (called by `.ci/run`) downloads the
sdist of the installed PEFT into `.peft-sdist/`. This module imports PEFT's `TestPeftCustomModel` and re-runs the
bodies of its tests that are parametrised over PEFT's `TEST_CASES`, with `APET_CASES` instead: lora, masked lora,
adjacent/discrete deltas, bitfit (on linears, Conv1D and LayerNorm), adapters and combined parts, on PEFT's `MLP`,
`MLP_LayerNorm` and `EmbConv1D` (transformers `Conv1D`) models. PEFT's tests that are written for one PEFT method
(LoRA's `add_weighted_adapter`, trainable tokens, ...) are not collected. Cases that do not apply to APET are
listed below (`NOT_APPLICABLE`, `NOT_APPLICABLE_CASES`, `EXPECTED_FAILURES`), each with its reason.

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


# ------------------------------------------------------------------------------------ what applies, and why not
# Tests in `NOT_APPLICABLE` are not collected and `NOT_APPLICABLE_CASES` are left out of their test's cases (PEFT
# itself would skip them for APET, and a skip in CI is no test). `EXPECTED_FAILURES` are (test, case) pairs marked
# `xfail(strict=True)`: they must keep failing, so a change in behaviour shows up either way. Cases outside
# `DEFAULT_CASES` are marked `slow`:
#
#     python -m pytest -q tests/peft_suite            # the default subset (9 of 22 cases), as .ci/run runs it
#     python -m pytest -q tests/peft_suite -m slow    # the other 13 cases
#     python -m pytest -q tests/peft_suite -m ""      # all 22
ADAPTER_CASES = ("MLP adapter", "MLP adapter masked", "MLP_LayerNorm adapter layernorm")
NOT_MERGEABLE = ("APET's Plugin operation (adapter: y + σ(y D~^T) U~^T) is non-linear, so it cannot be merged into "
                 "the base weights; merge_adapter / merge_and_unload refuse it with a ValueError and change nothing "
                 "(tests/test_lifecycle.py, tests/test_loading_errors.py).")
# PEFT's tests that merge (merge_and_unload, merge_adapter, safe_merge), or whose half-precision checks compare
# against a merged model.
MERGING_TESTS = (
    "test_merge_layers", "test_merge_layers_fp16", "test_merge_layers_is_idempotent",
    "test_merge_layers_is_deterministic_in_train_mode", "test_safe_merge", "test_disable_adapters_with_merging",
    "test_delete_merged_adapter_raises_without_mutation", "test_delete_merged_adapter_only_rejects_the_merged_one",
    "test_forward_float16", "test_forward_bfloat16", "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
)

NOT_APPLICABLE = {
    "test_adding_multiple_adapters_with_bias_raises": (
        "checks LoRA-style `bias=` config options; APET has no such option (BitFit is its own `bias` part), and "
        "PEFT skips the test for configs without it."),
    "test_disable_adapter_with_bias_warns": "PEFT runs it for LoraConfig and BOFTConfig only (their `bias=` option).",
}

# (test, case) pairs PEFT itself skips for the case: deselected with PEFT's reason.
NOT_APPLICABLE_CASES = {
    ("test_active_adapter", "MLP lora modules_to_save"): (
        "PEFT skips it: multiple active adapters with modules_to_save are not supported (by PEFT, for any method)."),
}

# The default run (`.ci/run`) takes one case per operation and model family; the other cases run with `-m slow`.
# Measured on the shared 2-core machine: all 22 cases 336-695 s depending on load, too much for the default run.
DEFAULT_CASES = (
    "MLP lora lin0", "MLP masked lora discrete", "MLP delta discrete", "MLP delta adjacent rows", "MLP bitfit",
    "MLP adapter", "MLP combine lora bias delta", "MLP_LayerNorm bitfit layernorm", "EmbConv1D lora conv1d",
)

EXPECTED_FAILURES = {
    **{(test, case): NOT_MERGEABLE for test in MERGING_TESTS for case in ADAPTER_CASES},
}


def _is_case_parametrize(mark) -> bool:
    return mark.name == "parametrize" and mark.args and mark.args[0].replace(" ", "") == CASE_ARGS.replace(" ", "")


def _apet_cases(test: str) -> list:
    """The APET cases of PEFT's test `test`, with their marks (expected failure, slow)."""
    cases = []
    for name, model_id, kwargs in APET_CASES:
        if (test, name) in NOT_APPLICABLE_CASES:
            continue
        marks = [] if name in DEFAULT_CASES else [pytest.mark.slow]
        if (test, name) in EXPECTED_FAILURES:
            marks.append(pytest.mark.xfail(reason=EXPECTED_FAILURES[test, name], strict=True))
        cases.append(pytest.param(name, model_id, APETConfig, kwargs, id=name, marks=marks))
    return cases


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
        if not any(_is_case_parametrize(m) for m in marks) or name in NOT_APPLICABLE:
            attributes[name] = None  # not a test: pytest collects callables only
            continue
        copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
        copy.__dict__.update(func.__dict__)
        copy.__kwdefaults__ = func.__kwdefaults__
        copy.__qualname__ = f"TestAPETOnPeftSuite.{name}"
        copy.pytestmark = [m for m in marks if not _is_case_parametrize(m)] + [
            pytest.mark.parametrize(CASE_ARGS, _apet_cases(name)).mark]
        attributes[name] = copy
    return type("TestAPETOnPeftSuite", (base,), attributes)


TestAPETOnPeftSuite = _suite_class()
