"""MiCA (init_lora_weights="mica"): B from the base weight's minor left singular vectors, frozen; A from zero, trained.

Checked against the real peft: the same initial factors, the same frozen weights, files that load both ways with
equal outputs, and B unchanged by training, adapter switching and reloading.
"""

from __future__ import annotations

import pytest
import torch

import oxpeft
from conftest import twin

peft = pytest.importorskip("peft")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.lin0 = torch.nn.Linear(12, 20)
        self.conv = torch.nn.Conv1d(20, 4, 1)

    def forward(self, ids):
        return self.lin0(self.emb(ids)).sum(-1)


def _base() -> Net:
    torch.manual_seed(0)
    return Net()


def _mica(lib, model, **kwargs):
    return lib.get_peft_model(model, lib.LoraConfig(target_modules=["emb", "lin0"], init_lora_weights="mica", r=4, **kwargs))


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_initial_factors_and_frozen_weights_equal_peft():
    base = _base()
    ours, theirs = _mica(oxpeft, twin(base)), _mica(peft, twin(base))
    ours_state, theirs_state = _lora_state(ours), _lora_state(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    frozen = {k for k, v in ours.named_parameters() if "lora_" in k and not v.requires_grad}
    assert frozen == {k for k, v in theirs.named_parameters() if "lora_" in k and not v.requires_grad}
    assert frozen == {"base_model.model.lin0.lora_B.default.weight", "base_model.model.emb.lora_embedding_B.default"}
    # B spans the minor singular directions: B^T W is as small as the r smallest singular values.
    weight = base.lin0.weight.detach()
    b = ours.base_model.model.lin0.lora_B["default"].weight.detach()
    smallest = torch.linalg.svdvals(weight)[-4:]
    torch.testing.assert_close(torch.linalg.svdvals(b.T @ weight), smallest, rtol=1e-4, atol=1e-5)
    # A starts at zero: the model's output is unchanged.
    ids = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(ours(ids), base(ids))


def test_training_moves_only_a_and_files_load_both_ways(tmp_path):
    base = _base()
    model = _mica(oxpeft, twin(base))
    before = _lora_state(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 30, (4, 6))
    for _ in range(3):
        optimizer.zero_grad()
        model(ids).pow(2).mean().backward()
        optimizer.step()
    after = _lora_state(model)
    for key in before:
        moved = not torch.equal(before[key], after[key])
        assert moved == ("lora_A" in key or "lora_embedding_A" in key), key
    model.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(twin(base), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(loaded(ids), model(ids))
    assert not loaded.base_model.model.lin0.lora_B["default"].weight.requires_grad

    loaded.save_pretrained(tmp_path / "theirs")
    back = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "theirs", is_trainable=True)
    torch.testing.assert_close(back(ids), model(ids))
    assert not back.base_model.model.lin0.lora_B["default"].weight.requires_grad
    assert back.base_model.model.lin0.lora_A["default"].weight.requires_grad


def test_b_stays_frozen_through_switching_and_is_forgotten_on_delete():
    model = _mica(oxpeft, twin(_base()))
    model.add_adapter("other", oxpeft.LoraConfig(target_modules=["lin0"], r=2))
    model.set_adapter("other")
    model.set_adapter("default")
    model.set_requires_grad("default", True)
    layer = model.base_model.model.lin0
    assert not layer.lora_B["default"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    assert layer.frozen_peft_weight_names == {"default": ("lora_B",)}
    model.delete_adapter("default")
    assert layer.frozen_peft_weight_names == {}
    assert model.active_adapter == "other" and layer.lora_B["other"].weight.requires_grad


@pytest.mark.parametrize(
    "kwargs, targets, match",
    [
        ({}, ["conv"], "defined for Linear and Embedding"),
        ({"r": 13}, ["lin0"], r"needs r <= min\(20, 12\) = 12"),
        ({"use_dora": True}, ["lin0"], "cannot be combined"),
    ],
)
def test_refusals(kwargs, targets, match):
    config = dict(target_modules=targets, init_lora_weights="mica", r=4)
    config.update(kwargs)
    with pytest.raises(ValueError, match=match):
        oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(**config))
