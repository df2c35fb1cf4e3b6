"""BD-LoRA (block-diagonal LoRA factors) against the real peft: files both ways, outputs, merges."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import oxpeft
from conftest import make_llama

IDS = torch.tensor([[1, 5, 7, 3, 9, 1, 12, 30]])


def _config(lib, **bd):
    return lib.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False,
        use_bdlora=lib.BdLoraConfig(**{"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2, **bd}),
    )  # fmt: skip


def test_block_diagonal_factors_match_peft_both_ways(tmp_path):
    base = make_llama()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft)).eval()
    with torch.no_grad():  # B starts at zero in BD-LoRA; give it values so that the outputs differ from the base
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    want = theirs(IDS).logits
    ours = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(ours(IDS).logits, want, rtol=0, atol=1e-5)
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert tuple(q.lora_B["default"].weight.shape) == (q.out_features, 2)  # (out, r / nblocks)
    ours.save_pretrained(tmp_path / "ours")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.peft_config["default"].use_bdlora.nblocks == 2
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(IDS).logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.merge_and_unload()(IDS).logits, theirs.merge_and_unload()(IDS).logits, rtol=0, atol=1e-5)


def test_training_keeps_the_factors_block_diagonal():
    model = oxpeft.get_peft_model(make_llama(), _config(oxpeft))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    dense = q.lora_B["default"].dense_weight()
    half_out, half_r = dense.shape[0] // 2, dense.shape[1] // 2
    assert dense.abs().sum() > 0 and dense[:half_out, half_r:].abs().sum() == 0 and dense[half_out:, :half_r].abs().sum() == 0
    with torch.no_grad():
        unmerged = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=0, atol=1e-5)


def test_bad_bdlora_settings_are_refused():
    with pytest.raises(ValueError, match="overlapping"):
        oxpeft.BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["q_proj"])
    with pytest.raises(ValueError, match="matches neither A nor B"):
        oxpeft.get_peft_model(make_llama(), _config(oxpeft, target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"]))
    with pytest.raises(ValueError, match="divisible by nblocks"):
        oxpeft.get_peft_model(make_llama(), _config(oxpeft, nblocks=3))
    with pytest.raises(ValueError, match="use_bdlora and use_dora"):
        oxpeft.LoraConfig(r=4, use_dora=True, use_bdlora={"target_modules_bd_a": ["o_proj"]})


def test_oxpeft_merge_of_a_bdlora_adapter_equals_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    from test_cli import run as run_oxpeft

    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    model = oxpeft.get_peft_model(copy.deepcopy(base), _config(oxpeft))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    done = run_oxpeft("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "m"), "-q")
    assert done.returncode == 0, done.stderr
    offline = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for (name, p), (_, q) in zip(offline.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    done = run_oxpeft("unmerge", str(tmp_path / "m"), str(tmp_path / "adapter"), "-o", str(tmp_path / "b"), "-q")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors").read_bytes()
