"""KaSA (kasa_config): the base weight loses its r smallest singular components, the update is B @ diag @ A.

Checked against the real peft: the truncated base, outputs, merges, the regularisation loss and files both ways.
"""

from __future__ import annotations

import pytest
import torch

import oxpeft
from conftest import TwoLinears, two_linears, twin

peft = pytest.importorskip("peft")
_base = two_linears


def _kasa(lib, model, **kwargs):
    config = lib.LoraConfig(target_modules=["lin0", "lin1"], kasa_config=lib.KasaConfig(beta=0.1, gamma=0.01), r=4, **kwargs)
    return lib.get_peft_model(model, config)


def _randomise(model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():  # the same values in both libraries: the parameters are named alike
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def test_truncation_outputs_loss_and_merge_equal_peft():
    base, x = _base(), torch.randn(5, 10)
    results = {}
    for lib in (oxpeft, peft):
        model = _kasa(lib, twin(base))
        truncated = model.base_model.model.lin0.get_base_layer().weight.detach().clone()
        at_init = model(x)
        _randomise(model)
        out, loss = model(x), model._get_kasa_loss()
        merged = model.merge_and_unload()
        results[lib.__name__] = (truncated, at_init, out, loss, merged(x), merged.lin0.weight)
    for ours, theirs in zip(results["oxpeft"], results["peft"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    truncated = results["oxpeft"][0]
    # The base lost exactly its 4 smallest singular values.
    s = torch.linalg.svdvals(base.lin0.weight.detach())
    torch.testing.assert_close(torch.linalg.svdvals(truncated)[:6], s[:6], rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(truncated) == 6


def test_training_files_both_ways_and_low_cpu_mem_usage(tmp_path):
    base, x = _base(), torch.randn(5, 10)
    model = _kasa(oxpeft, twin(base))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x).pow(2).mean() + model._get_kasa_loss()).backward()
        optimizer.step()
    assert model.base_model.model.lin0.lora_diag["default"].grad is not None
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(x), model(x))
    theirs.save_pretrained(tmp_path / "theirs")
    for low_cpu_mem_usage in (False, True):
        back = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "theirs", low_cpu_mem_usage=low_cpu_mem_usage)
        torch.testing.assert_close(back(x), model(x))


def test_a_base_built_on_meta_is_truncated_at_its_first_forward():
    base, x = _base(), torch.randn(5, 10)
    reference = _kasa(oxpeft, twin(base))
    _randomise(reference)
    with torch.device("meta"):
        empty = TwoLinears()
    model = _kasa(oxpeft, empty)
    layer = model.base_model.model.lin0
    assert layer._kasa_pending == {"default"}
    state = {k: v for k, v in reference.base_model.model.state_dict().items() if "lora_" in k}
    state.update({k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
                  if k.split(".")[0] in ("lin0", "lin1") else k: v for k, v in base.state_dict().items()})
    model.base_model.model.load_state_dict(state, assign=True)
    torch.testing.assert_close(model(x), reference(x))
    assert layer._kasa_pending == set()


def test_mixing_and_unsupported_layers_are_refused():
    model = _kasa(oxpeft, _base())
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        model.add_adapter("plain", oxpeft.LoraConfig(target_modules=["lin0"]))
    plain = oxpeft.get_peft_model(_base(), oxpeft.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="the new adapter uses KaSA"):
        plain.add_adapter("kasa", oxpeft.LoraConfig(target_modules=["lin0"], kasa_config=oxpeft.KasaConfig()))
    for targets, kwargs, match in [
        (["emb"], {}, "full-precision nn.Linear"),
        (["lin1"], {"r": 6}, r"r < min\(in_features, out_features\) = 6"),
        (["lin0"], {"use_dora": True}, "cannot be combined with use_dora"),
    ]:
        base = _base()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            oxpeft.get_peft_model(base, oxpeft.LoraConfig(target_modules=targets, kasa_config={"beta": 0.0}, **kwargs))
        assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="beta"):
        oxpeft.KasaConfig(beta=-1.0)


def test_the_offline_merge_refuses_kasa_before_writing(tmp_path):
    from safetensors.torch import save_file

    base = _base()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    _kasa(oxpeft, twin(base)).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="'kasa_config' is set: KaSA truncates the base weights"):
        oxpeft.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
