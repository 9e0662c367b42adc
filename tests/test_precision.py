"""Precision and compilation: gradient checkpointing, bf16 autocast, bf16 base weights with fp32 adapter values,
and `torch.compile` (with a check that no graph break comes from APET code)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, model_inputs
from peft import get_peft_model
from torch import nn

from peft_apet import APETConfig, APETLayer

# The name users know; transformers 5 calls it deprecated in favour of `activation_checkpointing_enable`.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

# One single-part config per operation and mask flavour (non-identity, so that every tensor gets a gradient).
OPERATIONS = {
    "lora": lambda tt: APETConfig.lora(task_type=tt, init_weights=False),
    "adapter": lambda tt: APETConfig.adapter(mask="adjacent", density=0.5, task_type=tt, init_weights=False),
    "bias": lambda tt: APETConfig.bitfit(task_type=tt, init_weights=False),
    "delta-discrete": lambda tt: APETConfig.delta(mask="discrete", num_trainable_params=101, task_type=tt,
                                                  init_weights=False),
    "delta-adjacent": lambda tt: APETConfig.delta(mask="adjacent", num_trainable_params=101, task_type=tt,
                                                  init_weights=False),
    "delta-full": lambda tt: APETConfig.delta(mask=None, task_type=tt, init_weights=False),
    "prompt": lambda tt: APETConfig.prompt(num_virtual_tokens=3, mask="discrete", density=0.5, task_type=tt),
}


def unified(task_type: str, prompt: bool = False) -> APETConfig:
    parts = [APETConfig.lora(mask="adjacent"), APETConfig.adapter(mask="discrete"), APETConfig.bitfit(),
             APETConfig.delta(mask="discrete")]
    if prompt:
        parts.append(APETConfig.prompt(num_virtual_tokens=3, task_type=task_type))
    return APETConfig.combine(*parts, num_trainable_params=3000, task_type=task_type, init_weights=False)


def training_model(model_name: str, config: APETConfig, dtype: torch.dtype = torch.float32):
    """An APET model in train mode without dropout, so that runs can be compared exactly."""
    model = get_peft_model(MODELS[model_name][0]().to(dtype), config)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def gradients(model, model_name: str) -> dict[str, torch.Tensor]:
    model(**model_inputs(model_name, labels=True)).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("model_name,use_reentrant", [("bert", True), ("bert", False), ("llama", True),
                                                       ("llama", False), ("t5", False)])
def test_gradient_checkpointing_gives_the_same_gradients(model_name, use_reentrant):
    task_type = MODELS[model_name][1]
    expected = gradients(training_model(model_name, unified(task_type)), model_name)

    model = training_model(model_name, unified(task_type))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:  # reentrant checkpoints need an input that requires grad (the embeddings are frozen)
        model.enable_input_require_grads()
    calls = []
    # the first projection inside the blocks (embedding norms and prompts run outside the checkpointed blocks)
    layer = next(m for m in model.modules() if isinstance(m, APETLayer) and isinstance(m.get_base_layer(), nn.Linear))
    layer.register_forward_hook(lambda *_: calls.append(1))
    got = gradients(model, model_name)
    assert len(calls) == 2  # the layer ran again in backward: checkpointing is really on
    assert got.keys() == expected.keys()
    assert all(got[n] is not None for n in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # and it trains (a bias on attention keys has a zero gradient: softmax ignores a shift shared by all keys)
    values = {n: p.detach().clone() for n, p in model.named_parameters() if ".apet_weights." in n
              and p.grad.abs().max() > 1e-8}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert values and all(not torch.equal(p, values[n]) for n, p in model.named_parameters() if n in values)


# ---------------------------------------------------------------------------------- bf16


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm().clamp_min(1e-12))


def logit_gradients(model, model_name: str, autocast: bool) -> dict[str, torch.Tensor]:
    """Adapter gradients of a fixed linear function of the logits (no labels: with a random tiny model, the
    cross-entropy gradients of examples with different labels nearly cancel, which would measure that
    cancellation rather than the precision of the adapter)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**model_inputs(model_name)).logits
    (logits.float() * torch.tensor([1.0, -2.0])).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if ".apet_weights." in n}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_bf16_autocast_forward_and_backward(operation):
    model_name, task_type = "bert", "SEQ_CLS"
    model = training_model(model_name, OPERATIONS[operation](task_type))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**model_inputs(model_name, labels=True)).loss
    loss.backward()
    assert torch.isfinite(loss)
    apet = {n: p for n, p in model.named_parameters() if ".apet_weights." in n}
    assert apet and all(p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                        for p in apet.values())

    expected = logit_gradients(training_model(model_name, OPERATIONS[operation](task_type)), model_name, False)
    got = logit_gradients(training_model(model_name, OPERATIONS[operation](task_type)), model_name, True)
    # All adapter gradients as one vector: single tensors may have a zero gradient (a bias on attention keys).
    assert _relative_error(torch.cat([g.flatten() for g in got.values()]),
                           torch.cat([expected[n].flatten() for n in got])) < 0.03


@pytest.mark.parametrize("model_name", ["bert", "llama"])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_bf16_base_weights_train_fp32_adapter_values(model_name, operation):
    task_type = MODELS[model_name][1]
    model = training_model(model_name, OPERATIONS[operation](task_type), dtype=torch.bfloat16)
    apet = {n: p for n, p in model.named_parameters() if ".apet_weights." in n}
    assert apet and all(p.dtype == torch.float32 for p in apet.values())  # PEFT's autocast_adapter_dtype=True
    assert all(b.dtype == torch.int32 for n, b in model.named_buffers() if n.endswith(".index"))
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in apet)

    before = {n: p.detach().clone() for n, p in apet.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**model_inputs(model_name, labels=True))
    out.loss.backward()
    optimizer.step()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.grad.dtype == torch.float32 for p in apet.values())
    assert all(not torch.equal(p, before[n]) for n, p in apet.items())

    # The bf16 model computes what the fp32 one does, up to bf16 rounding.
    reference = training_model(model_name, OPERATIONS[operation](task_type)).eval()
    inputs = model_inputs(model_name)
    with torch.no_grad():
        reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        got, expected = model.eval()(**inputs).logits, reference(**inputs).logits
    assert _relative_error(got, expected) < 0.05


def test_adapter_values_can_stay_bf16():
    """`autocast_adapter_dtype=False` keeps the adapter in the base dtype; training still works."""
    model = get_peft_model(MODELS["llama"][0]().to(torch.bfloat16), unified("CAUSAL_LM"), autocast_adapter_dtype=False)
    apet = {n: p for n, p in model.named_parameters() if ".apet_weights." in n}
    assert all(p.dtype == torch.bfloat16 for p in apet.values())
    before = {n: p.detach().clone() for n, p in apet.items()}
    model.train()(**model_inputs("llama", labels=True)).loss.backward()
    torch.optim.SGD(apet.values(), lr=0.1).step()
    assert all(p.grad.dtype == torch.bfloat16 for p in apet.values())
    assert any(not torch.equal(p, before[n]) for n, p in apet.items())


# ---------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("model_name", [
    "bert", "llama",  # an encoder and a decoder in the default run; each compile takes 30-100 s on 2 busy cores
    pytest.param("roberta", marks=pytest.mark.slow), pytest.param("t5", marks=pytest.mark.slow),
])
def test_compiled_training_step_matches_eager_without_apet_graph_breaks(model_name):
    """Every operation (prompt included) on the four architectures README names: no graph break from APET code,
    and the compiled step gives the eager loss and gradients."""
    task_type = MODELS[model_name][1]
    config = unified(task_type, prompt=True)
    inputs = model_inputs(model_name, labels=True)
    eager = training_model(model_name, config)
    eager_loss = eager(**inputs).loss
    eager_loss.backward()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(training_model(model_name, config))(**inputs)
    from_apet = [str(b.reason) for b in explained.break_reasons if "peft_apet" in b.user_stack[-1].filename]
    assert not from_apet, from_apet

    torch._dynamo.reset()
    model = training_model(model_name, config)
    loss = torch.compile(model, backend="aot_eager")(**inputs).loss
    loss.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, param), (_, reference) in zip(model.named_parameters(), eager.named_parameters()):
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)
