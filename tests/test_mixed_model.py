"""`get_peft_model(..., mixed=True)` / `PeftMixedModel`: LoRA, LoHa and LoKr adapters side by side, with the real
HF PEFT's mixed model as the oracle for state-dict keys, outputs, merging and deletion."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import oxpeft

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x).relu())


def _base() -> TwoLinear:
    torch.manual_seed(0)
    return TwoLinear().eval()


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))


def _mixed(lib):
    """LoRA on lin0, LoHa on both layers (wrapping the LoRA layer on lin0), LoKr on lin1; all three active."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "added but not active"
        model = lib.get_peft_model(
            _base(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False), "a", mixed=True
        )
        model.add_adapter("b", lib.LoHaConfig(target_modules=["lin0", "lin1"], init_weights=False))
        model.add_adapter("c", lib.LoKrConfig(target_modules=["lin1"], init_weights=False))
    model.set_adapter(["a", "b", "c"])
    return model


def _pair():
    """The same three adapters in PEFT and in oxpeft, oxpeft's loaded from PEFT's state dicts. PEFT keys the LoRA
    adapter, whose layer the LoHa layer wraps, `lin0.base_layer.lora_A...` (and the LoHa adapter on lin1, which
    the LoKr layer wraps, `lin1.base_layer.hada_...`); oxpeft keys them as a plain model
    does (`lin0.lora_A...`), so that its files load into any model, and reads PEFT's form too."""
    theirs, ours = _mixed(peft), _mixed(oxpeft)
    for name in ("a", "b", "c"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        plain = {k.replace(".base_layer.lora_", ".lora_").replace(".base_layer.hada_", ".hada_"): v for k, v in state.items()}
        assert sorted(oxpeft.get_peft_model_state_dict(ours, adapter_name=name)) == sorted(plain)
        result = oxpeft.set_peft_model_state_dict(ours, state, adapter_name=name)
        assert not result.unexpected_keys
    return theirs, ours


def test_mixed_model_runs_every_active_adapter_like_peft():
    theirs, ours = _pair()
    assert isinstance(ours, oxpeft.PeftMixedModel) and ours.active_adapters == ["a", "b", "c"]
    assert type(ours.base_model.model.lin0).__name__ == "LoHaLayer"  # the later method wraps the earlier one
    expected = theirs(X)
    assert not torch.allclose(expected, _base()(X), atol=1e-3)
    torch.testing.assert_close(ours(X), expected)
    for active in (["a"], ["b", "c"], ["a", "c"]):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        torch.testing.assert_close(ours(X), theirs(X))
    with ours.disable_adapter():
        torch.testing.assert_close(ours(X), _base()(X))
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)


def test_mixed_model_merges_and_deletes_like_peft():
    theirs, ours = _pair()
    expected = theirs(X)
    merged = copy.deepcopy(ours).merge_and_unload()
    assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
    torch.testing.assert_close(merged(X), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged(X), copy.deepcopy(theirs).merge_and_unload()(X), atol=1e-6, rtol=1e-6)
    unloaded = copy.deepcopy(ours).unload()
    torch.testing.assert_close(unloaded(X), _base()(X))
    # Deleting the LoHa adapter unwraps its layers and keeps the LoRA layer it wrapped.
    theirs.delete_adapter("b")
    ours.delete_adapter("b")
    assert ours.active_adapters == ["a", "c"] and sorted(theirs.active_adapters) == ["a", "c"]  # PEFT: set order
    assert type(ours.base_model.model.lin0).__name__ == "Linear" and "lora" in repr(ours.base_model.model.lin0)
    torch.testing.assert_close(ours(X), theirs(X))


def test_mixed_model_saves_adapters_that_load_back_and_in_peft(tmp_path):
    theirs, ours = _pair()
    expected = theirs(X)
    ours.save_pretrained(tmp_path)
    loaded = oxpeft.PeftMixedModel.from_pretrained(_base(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.load_adapter(tmp_path / "c", "c")
    loaded.set_adapter(["a", "b", "c"])
    torch.testing.assert_close(loaded(X), expected)
    in_peft = peft.PeftMixedModel.from_pretrained(_base(), tmp_path / "a", adapter_name="a")
    in_peft.load_adapter(tmp_path / "b", "b")
    in_peft.load_adapter(tmp_path / "c", "c")
    in_peft.set_adapter(["a", "b", "c"])
    torch.testing.assert_close(in_peft(X), expected)


def test_mixed_model_refuses_incompatible_methods_and_changes_nothing():
    model = _mixed(oxpeft)
    before = model(X)
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        model.add_adapter("d", oxpeft.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="not compatible"):
        oxpeft.get_peft_model(_base(), oxpeft.AdaLoraConfig(target_modules=["lin0"], total_step=10), mixed=True)
    assert sorted(model.peft_config) == ["a", "b", "c"]
    torch.testing.assert_close(model(X), before)
    # A plain PeftModel still holds one method.
    plain = oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="cannot add a"):
        plain.add_adapter("x", oxpeft.LoHaConfig(target_modules=["lin0"]))
