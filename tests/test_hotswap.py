"""Hot-swapping LoRA adapters in place (`oxpeft.utils.hotswap`), against a fresh load of the new adapter and
against the real peft's hotswap."""

from __future__ import annotations

import copy

import peft
import peft.utils.hotswap as peft_hotswap
import pytest
import torch

import oxpeft
from conftest import make_llama
from oxpeft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

IDS = torch.tensor([[1, 5, 7, 3, 9, 1, 12, 30]])


def _adapter(path, seed, **kw):
    torch.manual_seed(seed)
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(**{"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kw}))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("prepare", [True, False])
def test_hotswap_gives_the_new_adapters_outputs_in_the_same_tensors(prepare, tmp_path):
    first = _adapter(tmp_path / "a", 1, r=4, lora_alpha=8)
    second = _adapter(tmp_path / "b", 2, r=8 if prepare else 4, lora_alpha=3)
    want = oxpeft.PeftModel.from_pretrained(make_llama(), second).eval()(IDS).logits
    model = oxpeft.PeftModel.from_pretrained(make_llama(), first).eval()
    before = model(IDS).logits
    if prepare:
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        torch.testing.assert_close(model(IDS).logits, before)  # padding changes nothing
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    tensors = [q.lora_A["default"].weight, q.lora_B["default"].weight]
    hotswap_adapter(model, str(second), adapter_name="default")
    torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=1e-5)
    # The same tensors hold the new values: a compiled graph would keep reading them.
    assert tensors[0] is q.lora_A["default"].weight and tensors[1] is q.lora_B["default"].weight
    # The real peft does the same swap.
    theirs = peft.PeftModel.from_pretrained(make_llama(), first).eval()
    if prepare:
        peft_hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=8)
    peft_hotswap.hotswap_adapter(theirs, str(second), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(theirs(IDS).logits, want, rtol=0, atol=1e-5)


def test_incompatible_adapters_are_refused_before_anything_changes(tmp_path):
    first = _adapter(tmp_path / "a", 1, r=4)
    model = oxpeft.PeftModel.from_pretrained(make_llama(), first).eval()
    before = model(IDS).logits
    with pytest.raises(ValueError, match="use_rslora"):
        hotswap_adapter(model, str(_adapter(tmp_path / "rs", 2, r=4, use_rslora=True)), adapter_name="default")
    with pytest.raises(RuntimeError, match="unexpected keys"):
        hotswap_adapter(model, str(_adapter(tmp_path / "k", 2, r=4, target_modules=["k_proj"])), adapter_name="default")
    with pytest.raises(ValueError, match="Incompatible shapes"):
        hotswap_adapter(model, str(_adapter(tmp_path / "big", 2, r=8)), adapter_name="default")
    torch.testing.assert_close(model(IDS).logits, before)
    model.merge_adapter()
    with pytest.raises(ValueError, match="currently merged"):
        hotswap_adapter(model, str(_adapter(tmp_path / "c", 3, r=4)), adapter_name="default")
    with pytest.raises(ValueError, match="before compiling|No adapter layers"):
        prepare_model_for_compiled_hotswap(make_llama())
