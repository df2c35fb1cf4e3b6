"""LoRA on nn.MultiheadAttention against the real peft: files both ways, outputs, training, merges, unloading."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import oxpeft


class _Net(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x):
        out, _ = self.mha(x, x, x)
        return self.head(out)


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def _config(lib, **kw):
    return lib.LoraConfig(**{"r": 4, "target_modules": ["mha"], "init_lora_weights": False, **kw})


def _reference(layer) -> _Net:
    """The base with W + dW written into in_proj and out_proj: what a LoRA adapter on the attention computes."""
    net = _Net()
    with torch.no_grad():
        for name in layer.lora_A:
            net.mha.in_proj_weight += layer.get_delta_weight(name)
            net.mha.out_proj.weight += layer.base_layer.out_proj.get_delta_weight(name)
    return net


def test_mha_lora_files_move_both_ways_and_outputs_are_w_plus_delta(tmp_path):
    """The same files as PEFT's, both ways. Outputs are the base with W + dW in both projections. PEFT 0.21.2 adds
    out_proj's delta twice in its forward and its merge (huggingface/peft PR #3774 fixes that); oxpeft does not."""
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_Net(), _config(peft)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = oxpeft.PeftModel.from_pretrained(_Net(), tmp_path / "peft").eval()
    want = _reference(ours.base_model.model.mha)(X)
    torch.testing.assert_close(ours(X), want, rtol=0, atol=1e-5)
    assert not torch.allclose(want, _Net()(X))
    ours.save_pretrained(tmp_path / "ours")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in b
    back = peft.PeftModel.from_pretrained(_Net(), tmp_path / "ours").eval()
    for (name, p), (_, q) in zip(back.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), name
    merged = ours.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention and type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(merged(X), want, rtol=0, atol=1e-5)


def test_mha_lora_trains_switches_merges_and_deletes():
    model = oxpeft.get_peft_model(_Net(), _config(oxpeft, init_lora_weights=True))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.mha.base_layer.out_proj.lora_A.default.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.default.weight",
        "base_model.model.mha.lora_A.default.weight",
        "base_model.model.mha.lora_B.default.weight",
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(X).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    trained = model(X)
    model.add_adapter("other", _config(oxpeft))
    model.set_adapter("other")
    other = model(X)
    assert not torch.allclose(other, trained)
    with model.disable_adapter():
        torch.testing.assert_close(model(X), _Net()(X))
    model.set_adapter("default")
    model.merge_adapter()
    torch.testing.assert_close(model(X), trained, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(X), trained, rtol=0, atol=1e-6)
    model.delete_adapter("other")
    assert "other" not in model.base_model.model.mha.base_layer.out_proj.lora_A
    torch.testing.assert_close(model.unload()(X), _Net()(X))


def test_mha_options_it_cannot_take_are_refused():
    with pytest.raises(ValueError, match="DoRA"):
        oxpeft.get_peft_model(_Net(), _config(oxpeft, use_dora=True))
    net = _Net()
    net.mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    with pytest.raises(ValueError, match="same size"):
        oxpeft.get_peft_model(net, _config(oxpeft))


def test_oxpeft_merge_of_an_mha_adapter_equals_merge_and_unload(tmp_path):
    """The offline merge puts the in_proj delta into `in_proj_weight` and the out_proj delta (saved under
    `base_layer.out_proj`) into `out_proj.weight`, and unmerges back to the same bytes."""
    from safetensors.torch import save_file

    from test_cli import run as run_oxpeft

    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in _Net().state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    model = oxpeft.get_peft_model(_Net(), _config(oxpeft))
    model.save_pretrained(tmp_path / "adapter")
    want = model.merge_and_unload().state_dict()
    done = run_oxpeft("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "m"), "-q")
    assert done.returncode == 0, done.stderr
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(got["mha.in_proj_weight"], _Net().mha.in_proj_weight)
    assert not torch.equal(got["mha.out_proj.weight"], _Net().mha.out_proj.weight)
    done = run_oxpeft("unmerge", str(tmp_path / "m"), str(tmp_path / "adapter"), "-o", str(tmp_path / "b"), "-q")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors").read_bytes()
