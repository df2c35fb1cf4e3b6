"""MonteCLoRA (monteclora_config): lora_A is a learnt mixture of noisy copies of itself in training, plain LoRA
otherwise. Checked against the real peft: files, evaluation outputs, the variational loss for the same state, the
spread of the sampled lora_A, merges (in memory and offline) and the Trainer mixin."""

from __future__ import annotations

import pytest
import torch

import oxpeft
from conftest import two_linears, twin

peft = pytest.importorskip("peft")
_base = two_linears


def _model(lib, base, **settings):
    settings = {"num_samples": 4, "use_entropy": True, "buffer_size": 3, **settings}
    config = lib.LoraConfig(target_modules=["lin0", "lin1"], r=4, monteclora_config=lib.MontecloraConfig(**settings))
    model = lib.get_peft_model(twin(base), config)
    torch.manual_seed(1)
    with torch.no_grad():  # the same values in both libraries: the parameters are named alike
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.rand_like(p) * 0.3)
    return model


def test_files_evaluation_and_loss_equal_peft(tmp_path):
    base, x = _base(), torch.randn(3, 10)
    ours, theirs = _model(oxpeft, base), _model(peft, base)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.base_model._get_monteclora_loss() == 0.0 == theirs.base_model._get_monteclora_loss()
    ours.train(), theirs.train()
    torch.testing.assert_close(ours.base_model._get_monteclora_loss(), theirs.base_model._get_monteclora_loss())

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    mine, peft_file = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    assert "base_model.model.lin0.lora_monteclora_sampler.std_prior" in mine
    for key, value in peft_file.items():
        torch.testing.assert_close(mine[key], value, msg=key)
    loaded = peft.PeftModel.from_pretrained(twin(base), tmp_path / "ours")
    back = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "theirs")
    ours.eval()
    torch.testing.assert_close(loaded(x), ours(x))
    torch.testing.assert_close(back(x), ours(x))
    sampler = back.base_model.model.lin0.lora_monteclora_sampler["default"]
    torch.testing.assert_close(sampler.std_prior, theirs.base_model.model.lin0.lora_monteclora_sampler["default"].std_prior)


def _perturbations(sample, a: torch.Tensor, draws: int) -> torch.Tensor:
    """`sample()` (lora_A as the sampler perturbs it) minus lora_A, over `draws` training steps."""
    return torch.stack([(sample() - a).detach() for _ in range(draws)])


def _peft_sample(model):
    layer = model.base_model.model.lin0
    noise, weights = layer.lora_monteclora_sampler["default"]()
    return torch.einsum("n,nir->ri", weights, layer.lora_A["default"].weight.T + noise)


def test_training_samples_spread_like_peft_and_train_the_priors():
    from oxpeft.tuners.lora.monteclora import sampled_lora_a

    base, x = _base(), torch.randn(6, 10)
    ours, theirs = _model(oxpeft, base, sample_scaler=0.05), _model(peft, base, sample_scaler=0.05)
    ours.train(), theirs.train()
    torch.manual_seed(3)
    a = ours.base_model.model.lin0.lora_A["default"].weight.detach()
    mine = _perturbations(lambda: sampled_lora_a(ours.base_model.model.lin0, "default"), a, 400)
    peft_draws = _perturbations(lambda: _peft_sample(theirs), a, 400)
    assert mine.abs().mean() > 0
    assert mine.std() == pytest.approx(float(peft_draws.std()), rel=0.15)
    assert mine.mean().abs() < 0.1 * mine.std()

    ours.eval()
    evaluation = ours(x)
    ours.train()
    assert not torch.allclose(ours(x), evaluation)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    before = ours.base_model.model.lin0.lora_monteclora_sampler["default"].std_prior.detach().clone()
    optimizer.zero_grad()
    (ours(x).pow(2).mean() + ours.base_model._get_monteclora_loss()).backward()
    optimizer.step()
    assert not torch.equal(ours.base_model.model.lin0.lora_monteclora_sampler["default"].std_prior, before)


def test_merges_are_plain_lora_in_memory_and_offline(tmp_path):
    from safetensors.torch import save_file

    from test_checkpoint_merge import read_checkpoint

    base, x = _base(), torch.randn(3, 10)
    model = _model(oxpeft, base)
    model.eval()
    expected = model(x)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected)

    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    oxpeft.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    oracle = peft.PeftModel.from_pretrained(twin(base), tmp_path / "adapter").merge_and_unload().state_dict()
    for key, value in read_checkpoint(tmp_path / "merged").items():
        torch.testing.assert_close(value, oracle[key], rtol=1e-6, atol=1e-7, msg=key)
    oxpeft.unmerge_checkpoint(tmp_path / "merged", tmp_path / "adapter", tmp_path / "back", progress=False)
    restored, original = read_checkpoint(tmp_path / "back"), read_checkpoint(tmp_path / "base")
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_trainer_mixin_adds_the_variational_loss():
    from oxpeft.helpers import MontecloraTrainerMixin

    class Task:
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = model(inputs["x"]).pow(2).mean()
            return (loss, {"n": 1}) if return_outputs else loss

    class Trainer(MontecloraTrainerMixin, Task):
        pass

    model = _model(oxpeft, _base())
    model.eval()
    x = torch.randn(3, 10)
    plain = Task().compute_loss(model, {"x": x})
    assert torch.equal(Trainer().compute_loss(model, {"x": x}), plain)  # 0.0 outside training
    model.train()
    torch.manual_seed(0)
    with_mixin, outputs = Trainer().compute_loss(model, {"x": x}, return_outputs=True)
    torch.manual_seed(0)
    task = Task().compute_loss(model, {"x": x})
    assert outputs == {"n": 1}
    torch.testing.assert_close(with_mixin, task + model.base_model._get_monteclora_loss())


def test_refusals():
    for targets, extra, match in [
        (["emb"], {}, "MonteCLoRA applies to LoRA on Linear layers"),
        (["lin0"], {"use_dora": True}, "monteclora_config cannot be combined with use_dora"),
    ]:
        with pytest.raises(ValueError, match=match):
            oxpeft.get_peft_model(
                _base(), oxpeft.LoraConfig(target_modules=targets, monteclora_config={"num_samples": 2}, **extra)
            )
    with pytest.raises(ValueError, match="num_samples"):
        oxpeft.MontecloraConfig(num_samples=0)
