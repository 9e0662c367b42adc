"""The lifecycle of issue 12: one table of operations, and an adapter planned once and built once with its final
masks (no state passed through private attributes of the config or the tuner)."""

from __future__ import annotations

import torch
from conftest import tiny_bert
from peft import PeftModel, get_peft_model

from peft_apet import APETConfig, APETLayer, MaskedWeight, plan_adapter
from peft_apet.loading import adapter_folder_being_loaded
from peft_apet.operations import OPERATION_OF_ROLE, OPERATIONS
from peft_apet.parts import OPERATIONS as CONFIG_OPERATIONS


def test_every_config_operation_has_one_entry_in_the_table():
    assert sorted(OPERATIONS) == sorted(CONFIG_OPERATIONS)
    roles = [role for op in OPERATIONS.values() for role in op.roles]
    assert len(roles) == len(set(roles)) == len(OPERATION_OF_ROLE)
    for op in OPERATIONS.values():
        assert set(op.init) == set(op.roles)
        assert op.mergeable == (op.merges_into is not None)


def test_the_plan_carries_the_masks_a_data_free_strategy_chose():
    config = APETConfig.delta(mask="discrete", num_trainable_params=300, mask_strategy="magnitude",
                              selection_scope="global", task_type="SEQ_CLS")
    plan = plan_adapter(tiny_bert(), config)
    tensors = {name: m.tensors["delta"] for name, m in plan.modules.items()}
    assert all(t.index is not None and t.index.numel() == t.num_entries for t in tensors.values())
    assert plan.mask_counts["delta"] == {name: t.num_entries for name, t in tensors.items()}
    assert sum(plan.mask_counts["delta"].values()) == 300
    assert config.parts[0].mask_counts is None  # planning does not write into the config

    model = get_peft_model(tiny_bert(), config)
    # recorded by the tuner after injection, in the adapter's own copy of the config (the user's stays as given)
    assert model.peft_config["default"].parts[0].mask_counts == plan.mask_counts["delta"]
    assert config.parts[0].mask_counts is None
    assert model.base_model.building_plan is None
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, APETLayer):
            assert torch.equal(module.apet_weights["default"]["delta"].index, tensors[name].index)


def test_layers_are_built_once_with_their_final_masks(monkeypatch):
    built = []
    original = MaskedWeight.__init__

    def counting_init(self, plan, *args, **kwargs):
        built.append(plan.role)
        original(self, plan, *args, **kwargs)

    monkeypatch.setattr(MaskedWeight, "__init__", counting_init)
    config = APETConfig.combine(APETConfig.delta(mask="discrete", mask_strategy="magnitude"),
                                APETConfig.lora(r=2, mask="discrete"), num_trainable_params=400, task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), config)
    tensors = [role for _, m in model.base_model.model.named_modules() if isinstance(m, APETLayer)
               for role in m.apet_weights["default"]]
    assert sorted(built) == sorted(tensors)


def test_the_folder_being_loaded_is_known_only_while_it_is_loaded(tmp_path):
    config = APETConfig.bitfit(task_type="SEQ_CLS")
    get_peft_model(tiny_bert(), config).save_pretrained(tmp_path / "adapter")
    seen = []
    original = PeftModel.add_adapter

    def spy(self, *args, **kwargs):
        seen.append(adapter_folder_being_loaded())
        return original(self, *args, **kwargs)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    PeftModel.add_adapter = spy
    try:
        loaded.load_adapter(tmp_path / "adapter", adapter_name="again")
    finally:
        PeftModel.add_adapter = original
    assert seen == [str(tmp_path / "adapter")]
    assert adapter_folder_being_loaded() is None
    assert "_loaded_from" not in vars(APETConfig.from_pretrained(tmp_path / "adapter"))
