"""VeLoRA against the real peft: the same compressed-activation gradients, files (with the projection vectors)
both ways, plain LoRA outputs and merges outside training."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import oxpeft
from conftest import make_llama

IDS = torch.tensor([[1, 5, 7, 3, 9, 1, 12, 30], [4, 4, 8, 2, 19, 6, 1, 0]])


def _config(lib, **velora):
    return lib.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        velora_config=lib.VeloraConfig(**{"num_groups": 4, **velora}),
    )  # fmt: skip


def _grads(model):
    model.train()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once"])
def test_gradients_files_and_merges_match_peft(init_type, tmp_path):
    base = make_llama()
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft, init_type=init_type))
    theirs.save_pretrained(tmp_path / "init")
    ours = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "init", is_trainable=True)
    want, got = _grads(theirs), _grads(ours)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    # The compressed gradient of lora_A is not the exact one.
    plain = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "init", is_trainable=True)
    for module in plain.modules():
        if hasattr(module, "lora_velora_embed"):
            for name in list(module.lora_velora_embed):
                del module.lora_velora_embed[name]
    exact = _grads(plain)
    a_key = next(k for k in want if "lora_A" in k)
    assert not torch.allclose(exact[a_key], got[a_key])

    theirs.save_pretrained(tmp_path / "trained")
    ours.save_pretrained(tmp_path / "ours")
    a, b = load_file(tmp_path / "trained" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("lora_velora_embed") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(back(IDS).logits, ours.eval()(IDS).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.merge_and_unload()(IDS).logits, back.merge_and_unload()(IDS).logits, rtol=0, atol=1e-5)


def test_bad_velora_settings_are_refused():
    with pytest.raises(ValueError, match="num_groups"):
        oxpeft.VeloraConfig(num_groups=0)
    with pytest.raises(ValueError, match="init_type"):
        oxpeft.VeloraConfig(init_type="nope")
    with pytest.raises(ValueError, match="cannot be combined"):
        oxpeft.LoraConfig(r=2, use_dora=True, velora_config={"num_groups": 2})


def test_oxpeft_merge_of_a_velora_adapter_is_its_lora_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    from test_cli import run as run_oxpeft

    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    model = oxpeft.get_peft_model(copy.deepcopy(base), _config(oxpeft))
    _grads(model)
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    done = run_oxpeft("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "m"), "-q")
    assert done.returncode == 0, done.stderr
    offline = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for (name, p), (_, q) in zip(offline.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
