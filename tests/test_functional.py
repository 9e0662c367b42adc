"""Discrete masked deltas in each of their kernels (gathers, CSR, a transient dense copy) against autograd on
the written-out formula `y = x (W + W~)^T + b`, through `get_peft_model`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import OneLayer
from peft import get_peft_model

import peft_apet.functional
import peft_apet.routes
import peft_apet.sparse_kernels
from peft_apet import APETConfig

IN, OUT, TOKENS = 48, 40, 4  # one (40, 48) layer: 1,920 entries; the input is (2, 2, 48), 4 tokens


def _adapted(k: int, dtype: torch.dtype, adapters: int = 1, seed: int = 0, shape: tuple[int, int] = (OUT, IN)):
    torch.manual_seed(0)
    config = APETConfig.delta(target_modules=["proj"], num_trainable_params=k, init_weights=False, seed=seed)
    model = get_peft_model(OneLayer(shape[1], shape[0]).to(dtype), config)
    for i in range(1, adapters):
        model.add_adapter(f"extra{i}", APETConfig.delta(target_modules=["proj"], num_trainable_params=k,
                                                        init_weights=False, seed=i))
    layer = model.base_model.model.proj
    layer.set_adapter(list(layer.apet_weights))  # every adapter active at once
    for weights in layer.apet_weights.values():
        weights["delta"].values.data = weights["delta"].values.data.to(dtype)
    return model, layer


def _assert_matches_dense_formula(model, layer, dtype):
    """Output, input gradient and value gradients equal autograd through `x (W + W~)^T + b`."""
    out_f, in_f = layer.out_features, layer.in_features
    deltas = [w["delta"] for w in layer.apet_weights.values()]
    x = torch.randn(2, 2, in_f, dtype=dtype, requires_grad=True)
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    base = layer.get_base_layer()
    values = [d.values.detach().clone().requires_grad_(True) for d in deltas]
    x_ref = x.detach().clone().requires_grad_(True)
    dense = sum(torch.zeros(out_f * in_f, dtype=dtype).index_add(0, d.flat_indices(), v).view(out_f, in_f)
                for d, v in zip(deltas, values))
    expected = F.linear(x_ref, base.weight + dense, base.bias)
    expected.backward(grad_out)

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for d, v in zip(deltas, values):
        torch.testing.assert_close(d.values.grad, v.grad, **tol)


# Either CSR product route, forced, in both directions (forward x W~^T, backward g W~), on one (64, 96) layer.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [100, 320, 350])
@pytest.mark.parametrize("route", ["csr_strided", "csr_contiguous"])
def test_csr_products_write_strided_or_through_contiguous_copies(monkeypatch, route, k, dtype):
    taken, product = [], peft_apet.sparse_kernels._add_product_t

    def spy(out, sparse, dense, how):
        taken.append(how)
        return product(out, sparse, dense, how)

    monkeypatch.setattr(peft_apet.sparse_kernels, "_add_product_t", spy)
    model, layer = _adapted(k, dtype, shape=(64, 96))
    with peft_apet.routes.forced(forward=route, grad_x=route):
        _assert_matches_dense_formula(model, layer, dtype)
    assert taken == [route, route]


# The routes the cost model picks (`routes.choose`) for k = 20 (below the layer width 48), 60 and 120 (sorted),
# 500 (denser), and two adapters at once (unsorted positions: no CSR): CSR kernels run exactly when a CSR route is
# picked, and the k-sparse forward product exactly when the forward is not the composed `W + W~`.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "adapters"), [(20, 1), (60, 1), (120, 1), (500, 1), (20, 2), (60, 2)])
def test_discrete_delta_equals_dense_formula(monkeypatch, k, adapters, dtype):
    """Output, input gradient and value gradients of the chosen kernels equal autograd through `x (W + W~)^T + b`."""
    calls = {"csr": 0, "sparse": 0}
    chosen, choose = [], peft_apet.routes.choose

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    def recorded(case):
        chosen.append(choose(case))
        return chosen[-1]

    monkeypatch.setattr(peft_apet.sparse_kernels, "_csr", spy("csr", peft_apet.sparse_kernels._csr))
    monkeypatch.setattr(peft_apet.functional, "add_x_wt", spy("sparse", peft_apet.functional.add_x_wt))
    monkeypatch.setattr(peft_apet.routes, "choose", recorded)
    model, layer = _adapted(k, dtype, adapters)
    _assert_matches_dense_formula(model, layer, dtype)
    (routes,) = chosen
    assert (calls["csr"] > 0) == any(r.startswith(("csr", "sampled_csr")) for r in (routes.forward, routes.grad_x,
                                                                                     routes.values))
    assert (calls["sparse"] > 0) == (routes.forward != "composed")
    if adapters > 1:
        assert "csr" not in routes.forward + routes.grad_x + routes.values


def _formula(model, layer, x):
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()
    dense = torch.zeros(OUT * IN).index_add(0, delta.flat_indices(), delta.values.detach()).view(OUT, IN)
    return F.linear(x, base.weight + dense, base.bias)


def test_a_new_mask_is_used_after_loading_another_adapter_into_the_same_layer():
    """The kernels keep index arrays per mask: loading other positions (in place) must not reuse stale ones."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    model, layer = _adapted(200, torch.float32)
    other, _ = _adapted(200, torch.float32, seed=1)
    other_state = get_peft_model_state_dict(other)
    x = torch.randn(2, 2, IN)
    torch.testing.assert_close(model(x), _formula(model, layer, x))  # computes and keeps the first layout
    before = layer.apet_weights["default"]["delta"].flat_indices().clone()
    set_peft_model_state_dict(model, other_state)
    after = layer.apet_weights["default"]["delta"].flat_indices()
    assert not torch.equal(before, after)
    torch.testing.assert_close(model(x), _formula(model, layer, x))


@pytest.mark.parametrize(("mask", "k", "kept"), [("discrete", 100, True), ("discrete", 240, True),
                                                 ("discrete", 241, False), (None, None, False)])
def test_index_arrays_are_kept_only_for_discrete_masks_up_to_density_one_eighth(mask, k, kept):
    """A (40, 48) layer: 1,920 entries, density 1/8 = 240. Denser masks and unmasked deltas (whose index arrays
    would outweigh the weight) rebuild them per call; results equal the dense formula either way."""
    torch.manual_seed(0)
    config = APETConfig.delta(target_modules=["proj"], mask=mask, num_trainable_params=k, init_weights=False)
    model = get_peft_model(OneLayer(IN, OUT), config)
    layer = model.base_model.model.proj
    _assert_matches_dense_formula(model, layer, torch.float32)
    delta = layer.apet_weights["default"]["delta"]
    assert (delta in peft_apet.functional._LAYOUTS) == kept
    assert (peft_apet.functional.layout_of(delta) is peft_apet.functional.layout_of(delta)) == kept


def _saved_tensors(fn) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while `fn()` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward while `fn()` runs."""
    return [tuple(t.shape) for t in _saved_tensors(fn)]


# (64, 256) layer, 8 tokens: k = 16 entries use at most 16 of the 256 input columns, so the layer keeps only those
# columns of its input for the value gradients; k = 600 uses about 230 (more than a quarter): the input itself.
@pytest.mark.parametrize("adapters", [1, 2])
@pytest.mark.parametrize(("k", "compact"), [(16, True), (600, False)])
def test_backward_keeps_only_the_input_columns_the_entries_use(k, compact, adapters):
    model, layer = _adapted(k, torch.float32, adapters, shape=(64, 256))
    _assert_matches_dense_formula(model, layer, torch.float32)
    used = torch.cat([w["delta"].flat_indices() % 256 for w in layer.apet_weights.values()]).unique().numel()
    x = torch.randn(8, 256, requires_grad=True)
    shapes = _saved_shapes(lambda: model(x))
    if compact:
        assert (8, used) in shapes and (8, 256) not in shapes
    else:
        assert (8, 256) in shapes and (8, used) not in shapes


@pytest.mark.parametrize("route", ["gather", "sampled_csr", "dense"])
def test_every_value_gradient_route_runs_on_the_kept_columns(route):
    """The value-gradient route chosen for the whole input also runs on the `(out, u)` layout of the kept columns."""
    model, layer = _adapted(16, torch.float64, shape=(64, 256))
    assert peft_apet.functional.layout_of(layer.apet_weights["default"]["delta"]).compact is not None
    with peft_apet.routes.forced(values=route):
        _assert_matches_dense_formula(model, layer, torch.float64)


@pytest.mark.parametrize(("k", "compact"), [(16, True), (600, False)])
def test_side_path_keeps_only_the_input_columns_the_entries_use(k, compact):
    """`add_sparse_delta` (the side path of quantized bases) on a plain product, against the dense formula."""
    _, layer = _adapted(k, torch.float32, shape=(64, 256))
    delta = layer.apet_weights["default"]["delta"]
    weight = layer.get_base_layer().weight.detach()
    x = torch.randn(8, 256, requires_grad=True)
    out = {}
    shapes = _saved_shapes(lambda: out.setdefault("y", peft_apet.functional.add_sparse_delta(x @ weight.T, x,
                                                                                          [delta])))
    grad_out = torch.randn(8, 64)
    out["y"].backward(grad_out)
    values = delta.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = torch.zeros(64 * 256).index_add(0, delta.flat_indices(), values).view(64, 256)
    expected = x_ref @ (weight + dense).T
    expected.backward(grad_out)
    torch.testing.assert_close(out["y"], expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(delta.values.grad, values.grad)
    used = (delta.flat_indices() % 256).unique().numel()
    assert ((8, used) in shapes) == compact and ((8, 256) in shapes) != compact


@pytest.mark.parametrize(("axis", "lines", "rem"), [(0, 4, 3), (0, 0, 3), (0, 0, 100), (1, 4, 3), (1, 0, 3),
                                                   (1, 0, 40)])
def test_adjacent_backward_keeps_the_input_or_its_trained_columns_and_no_product(axis, lines, rem):
    """A (64, 256) layer with 4 whole rows (the input `(8, 256)` kept) or 4 whole columns (those `(8, 4)` columns
    kept), plus a partial line of `rem` entries: never the `(8, lines)` product of the rows. A partial row alone of at
    most a quarter of the inputs keeps a copy of what it reads, `(8, rem)`, and no view of x (a view keeps all of x
    alive); a longer one keeps a view of x (shared with other layers reading x). Output and gradients match the
    formula."""
    torch.manual_seed(0)
    config = APETConfig.delta(target_modules=["proj"], mask="adjacent", mask_axis=axis, init_weights=False,
                              num_trainable_params=lines * (256 if axis == 0 else 64) + rem)
    model = get_peft_model(OneLayer(256, 64), config)
    layer = model.base_model.model.proj
    delta = layer.apet_weights["default"]["delta"]
    x = torch.randn(8, 256, requires_grad=True)
    saved = _saved_tensors(lambda: model(x))
    shapes = [tuple(t.shape) for t in saved]
    kept_x = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    if lines:
        assert (8, 4) not in shapes if axis == 0 else ((8, 4) in shapes and not kept_x)
    elif axis == 0:
        assert kept_x == (4 * rem > 256) and ((8, rem) in shapes)
    else:
        assert not kept_x
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    values = delta.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    base = layer.get_base_layer()
    dense = torch.zeros(64 * 256).index_add(0, delta.flat_indices(), values).view(64, 256)
    expected = F.linear(x_ref, base.weight + dense, base.bias)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(delta.values.grad, values.grad)


@pytest.mark.parametrize("frozen", ["values", "input"])
def test_whole_rows_keep_only_what_the_needed_gradients_read(frozen):
    """Whole trainable rows: with frozen values backward needs only `V` (not the input); with an input that needs no
    gradient it needs only the input (not `V`). Gradients that are needed still match the formula."""
    torch.manual_seed(0)
    config = APETConfig.delta(target_modules=["proj"], mask="adjacent", mask_axis=0, init_weights=False,
                              num_trainable_params=4 * 256)
    model = get_peft_model(OneLayer(256, 64), config)
    layer = model.base_model.model.proj
    delta = layer.apet_weights["default"]["delta"]
    delta.values.requires_grad_(frozen != "values")
    x = torch.randn(8, 256, requires_grad=frozen != "input")
    saved = _saved_tensors(lambda: model(x))
    kept_x = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    kept_v = any(t.untyped_storage().data_ptr() == delta.values.untyped_storage().data_ptr() for t in saved)
    assert (kept_x, kept_v) == ((False, True) if frozen == "values" else (True, False))
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    base = layer.get_base_layer()
    values = delta.values.detach().clone().requires_grad_(frozen != "values")
    x_ref = x.detach().clone().requires_grad_(frozen != "input")
    dense = torch.zeros(64 * 256).index_add(0, delta.flat_indices(), values).view(64, 256)
    F.linear(x_ref, base.weight + dense, base.bias).backward(grad_out)
    if frozen == "values":
        torch.testing.assert_close(x.grad, x_ref.grad)
    else:
        torch.testing.assert_close(delta.values.grad, values.grad)


# The `patched` route adds W~ into the base weight for one matmul and writes W's entries back after it.
@pytest.mark.parametrize("adapters", [1, 2])  # two: repeated positions are possible in the joint layout
def test_patched_route_equals_the_formula_and_leaves_the_base_weight_bit_for_bit(adapters):
    model, layer = _adapted(300, torch.float32, adapters)
    weight = layer.get_base_layer().weight
    before, version = weight.detach().clone(), weight._version
    with peft_apet.routes.forced(forward="patched", grad_x="patched"):
        _assert_matches_dense_formula(model, layer, torch.float32)
    assert torch.equal(weight, before) and weight._version == version


def test_patched_and_composed_routes_give_identical_outputs_and_gradients():
    model, layer = _adapted(300, torch.float32)
    x = torch.randn(2, 2, IN)
    results = []
    for route in ("composed", "patched"):
        layer.apet_weights["default"]["delta"].values.grad = None
        x_in = x.clone().requires_grad_(True)
        with peft_apet.routes.forced(forward=route, grad_x=route):
            out = model(x_in)
            out.pow(2).sum().backward()
        results.append((out.detach(), x_in.grad, layer.apet_weights["default"]["delta"].values.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_patched_weight_that_another_node_saved_raises_no_inplace_error():
    """The base layer applied twice in one graph, and its weight saved by a plain matmul in between: the in-place
    patch is written through `.data`, so autograd sees no modification and every gradient is right."""
    model, layer = _adapted(300, torch.float32)
    weight = layer.get_base_layer().weight
    x = torch.randn(3, IN, requires_grad=True)
    with peft_apet.routes.forced(forward="patched", grad_x="patched"):
        hidden = F.linear(x, weight)  # saves `weight` for the input gradient
        out = model(torch.cat([hidden, hidden[:, :IN - OUT]], dim=1))
        out = model(out.repeat(1, 2)[:, :IN])
        out.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    dense = torch.zeros(OUT * IN).index_add(0, layer.apet_weights["default"]["delta"].flat_indices(),
                                            layer.apet_weights["default"]["delta"].values.detach()).view(OUT, IN)
    base = layer.get_base_layer()
    hidden = F.linear(x_ref, weight)
    out = F.linear(torch.cat([hidden, hidden[:, :IN - OUT]], dim=1), base.weight + dense, base.bias)
    F.linear(out.repeat(1, 2)[:, :IN], base.weight + dense, base.bias).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_an_error_inside_a_patched_product_restores_the_base_weight(monkeypatch):
    model, layer = _adapted(300, torch.float32)
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()

    def failing_linear(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(peft_apet.functional.F, "linear", failing_linear)
    with peft_apet.routes.forced(forward="patched"), pytest.raises(RuntimeError, match="simulated"):
        model(torch.randn(2, IN, requires_grad=True))
    assert torch.equal(weight, before)


def test_the_base_weight_is_patched_only_where_autograd_records_the_call(monkeypatch):
    """Under `no_grad` (inference, where threads may share a model) and on a non-contiguous weight the patched
    route is not available; in training, at a density where it is the cheapest, it is picked."""
    chosen, choose = [], peft_apet.routes.choose

    def recorded(case):
        chosen.append(case)
        return choose(case)

    monkeypatch.setattr(peft_apet.routes, "choose", recorded)
    model, layer = _adapted(300, torch.float32)
    x = torch.randn(2, IN, requires_grad=True)
    with torch.no_grad():
        model(x)
    model(x)
    assert [c.patchable for c in chosen] == [False, True]
    # grad mode on but nothing needing a gradient (serving a frozen adapter without no_grad): not recorded
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model(x.detach())
    assert not chosen[-1].patchable
    for parameter in layer.apet_weights.parameters():
        parameter.requires_grad_(True)
    weight = torch.randn(IN, OUT).t()  # an (out, in) view, as GPT-2's Conv1D weight
    delta = layer.apet_weights["default"]["delta"]
    peft_apet.functional.masked_delta_linear(x, weight, None, [delta])
    assert not chosen[-1].patchable
    with pytest.raises(ValueError, match="not all available"), peft_apet.routes.forced(forward="patched"):
        peft_apet.functional.masked_delta_linear(x, weight, None, [delta])


@pytest.mark.parametrize("offload", [False, True])  # save_on_cpu keeps the tensor itself on a CPU run
def test_double_backward_through_the_patched_route_equals_the_formula(offload):
    """A gradient penalty (`create_graph=True`): the backward's product saves `W + W~` for the second backward, so
    under grad mode it composes a copy instead of patching `W` (a patched `W` would be restored under it)."""
    import contextlib

    model, layer = _adapted(300, torch.float32)
    delta, base = layer.apet_weights["default"]["delta"], layer.get_base_layer()
    mix = torch.nn.Parameter(torch.randn(IN, IN) / IN**0.5)
    x = torch.randn(4, IN, requires_grad=True)
    values = delta.values.detach().clone().requires_grad_(True)
    dense = torch.zeros(OUT * IN).index_add(0, delta.flat_indices(), values).view(OUT, IN)
    grads = []
    for apet in (True, False):
        offloading = torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext()
        with peft_apet.routes.forced(forward="patched", grad_x="patched"), offloading:
            hidden = torch.tanh(F.linear(x, mix))
            out = model(hidden) if apet else F.linear(hidden, base.weight + dense, base.bias)
            (grad_x,) = torch.autograd.grad(out.pow(2).mean(), x, create_graph=True)
            grad_x.pow(2).sum().backward()
        grads.append([delta.values.grad if apet else values.grad, mix.grad.clone()])
        mix.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("train", [True, False])
def test_threads_sharing_a_model_leave_the_base_weight_intact(train):
    """Two threads on one model: training steps (multithreaded autograd; patched products on one weight are
    serialized) and serving a frozen adapter with grad mode on (not recorded, so never patched). The base weight
    ends bit for bit as it began and every served output is the formula's."""
    import threading

    model, layer = _adapted(300, torch.float32, shape=(512, 512))
    base = layer.get_base_layer()
    before = base.weight.detach().clone()
    delta = layer.apet_weights["default"]["delta"]
    dense = torch.zeros(512 * 512).index_add(0, delta.flat_indices(), delta.values.detach()).view(512, 512)
    case = peft_apet.routes.case_of(512, 512, 256, 300, dtype=torch.float32, device="cpu", autocast=False,
                                    strictly_sorted=True, patchable=True)
    assert peft_apet.routes.choose(case).forward == "patched"  # what a training step here takes, unforced
    if not train:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    wrong = []

    def work(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(40):
            x = torch.randn(256, 512, generator=generator)
            if train:
                model(x).pow(2).mean().backward()
            else:
                wrong.append(not torch.allclose(model(x), F.linear(x, before + dense, base.bias), atol=1e-5))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(base.weight, before) and not any(wrong)
