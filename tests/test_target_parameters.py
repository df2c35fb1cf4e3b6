"""LoRA on nn.Parameters (`target_parameters`): MoE expert stacks of a Qwen3-MoE-shaped model built from its config,
2-D parameters and transposed stacks, against the real peft for files, outputs and merges."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import oxpeft

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _config(lib, **kwargs):
    return lib.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": EXPERTS, **kwargs})


def test_peft_files_load_with_equal_logits_and_back(moe, tmp_path):
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(moe), _config(peft, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    want = theirs(_ids()).logits
    assert not torch.allclose(want, moe(_ids()).logits)  # the adapter does something

    ours = oxpeft.PeftModel.from_pretrained(copy.deepcopy(moe), tmp_path / "peft").eval()
    torch.testing.assert_close(ours(_ids()).logits, want, rtol=0, atol=1e-6)
    experts = ours.base_model.model.model.layers[0].mlp.experts
    # PEFT's nesting: parameters in registration order, the later one outside.
    assert (experts.parameter_name, experts.base_layer.parameter_name) == ("down_proj", "gate_up_proj")

    ours.save_pretrained(tmp_path / "ours")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in b
    back = peft.PeftModel.from_pretrained(copy.deepcopy(moe), tmp_path / "ours").eval()
    torch.testing.assert_close(back(_ids()).logits, want, rtol=0, atol=1e-6)
    fresh = oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft, init_lora_weights=False))
    assert fresh.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_training_the_experts_then_peft_loads_the_result(moe, tmp_path):
    model = oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if "experts" in name and ".lora_" in name:
            assert p.abs().sum() > 0, name  # B was zero at init and has moved: gradients reach every expert factor
    model.eval()
    want = model(ids).logits
    model.save_pretrained(tmp_path / "trained")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(moe), tmp_path / "trained").eval()
    torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=1e-5)

    # merge_and_unload: the same weights as PEFT's merge, and the same outputs as the unmerged model.
    ours_merged = model.merge_and_unload()
    theirs_merged = theirs.merge_and_unload()
    for (name, p), (_, q) in zip(ours_merged.named_parameters(), theirs_merged.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(ours_merged(ids).logits, want, rtol=0, atol=1e-5)
    assert not any("lora" in n for n, _ in ours_merged.named_parameters())


def test_adapters_switch_disable_and_delete(moe):
    model = oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft, init_lora_weights=False))
    model.add_adapter("other", _config(oxpeft, r=3, init_lora_weights=False))
    experts = model.base_model.model.model.layers[0].mlp.experts
    # The second adapter joins the existing wrappers instead of nesting new ones.
    assert isinstance(experts.base_layer.base_layer, nn.Module) and not hasattr(experts.base_layer.base_layer, "lora_A")
    assert set(experts.lora_A) == {"default", "other"}
    base_out = moe(_ids()).logits
    first = model(_ids()).logits
    model.set_adapter("other")
    second = model(_ids()).logits
    assert not torch.allclose(first, second)
    with model.disable_adapter():
        torch.testing.assert_close(model(_ids()).logits, base_out)
    model.delete_adapter("other")
    torch.testing.assert_close(model(_ids()).logits, first)
    model.merge_adapter()
    torch.testing.assert_close(model(_ids()).logits, first, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(_ids()).logits, first, rtol=0, atol=1e-6)
    unloaded = model.unload()
    torch.testing.assert_close(unloaded(_ids()).logits, base_out)


class _Holder(nn.Module):
    """A 2-D weight parameter and a transposed (experts, in, out) stack, used by a custom forward."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.stack = nn.Parameter(torch.randn(3, 5, 6) if transposed else torch.randn(3, 6, 5))
        self.is_transposed = transposed

    def forward(self, x):
        stack = self.stack if self.is_transposed else self.stack.transpose(1, 2)  # (experts, in, out)
        return x @ self.weight.T + torch.einsum("bi,eio->bo", x, stack)


class _Net(nn.Module):
    def __init__(self, transposed: bool):
        super().__init__()
        torch.manual_seed(4)
        self.block = _Holder(transposed)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("transposed", [False, True])
def test_2d_parameters_and_transposed_stacks_match_peft(transposed, tmp_path):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    kwargs = dict(r=2, target_modules=[], target_parameters=["block.weight", "block.stack"], init_lora_weights=False)
    torch.manual_seed(6)
    theirs = peft.get_peft_model(_Net(transposed), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "p")
    ours = oxpeft.PeftModel.from_pretrained(_Net(transposed), tmp_path / "p")
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.merge_and_unload()(x), theirs.merge_and_unload()(x), rtol=0, atol=1e-5)


def test_options_that_do_not_apply_to_a_parameter_are_refused(moe):
    for bad in [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)]:
        with pytest.raises(ValueError, match="ParamWrapper"):
            oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft, **bad))
    with pytest.raises(ValueError, match="match no parameter"):
        oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft, target_parameters=["mlp.experts.nothing"]))
    # A module that target_modules already adapts cannot also have a parameter wrapped.
    with pytest.raises(ValueError, match="already adapts"):
        oxpeft.get_peft_model(
            copy.deepcopy(moe), _config(oxpeft, target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"])
        )
    # A failed injection leaves the model as it was.
    model = copy.deepcopy(moe)
    with pytest.raises(ValueError):
        oxpeft.get_peft_model(model, _config(oxpeft, lora_dropout=0.1))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_qwen3_moe_experts_trained_saved_loaded_in_peft_and_merged_offline(moe, tmp_path):
    """The issue's end-to-end case: a Qwen3-MoE-shaped model trained with target_parameters on its experts, saved,
    loaded in the real peft with equal logits, and merged offline by the `oxpeft merge` command into the
    checkpoint transformers wrote (one weight per expert): equal to PEFT's merge_and_unload, and unmerged back to
    the base byte for byte."""
    from transformers import AutoModelForCausalLM

    from test_cli import run as run_oxpeft

    base_dir = tmp_path / "base"
    moe.save_pretrained(base_dir)
    model = oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = _ids()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir).eval(), tmp_path / "adapter"
    ).eval()
    torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)
    want = theirs.merge_and_unload()(ids).logits

    merged = tmp_path / "merged"
    done = run_oxpeft("merge", str(base_dir), str(tmp_path / "adapter"), "-o", str(merged), "-q")
    assert done.returncode == 0, done.stderr
    offline = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(offline(ids).logits, want, rtol=0, atol=1e-5)
    assert not torch.allclose(offline(ids).logits, moe(ids).logits)

    back = tmp_path / "back"
    done = run_oxpeft("unmerge", str(merged), str(tmp_path / "adapter"), "-o", str(back), "-q")
    assert done.returncode == 0, done.stderr
    assert (back / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes()


def test_an_adapter_on_fewer_parameters_saves_the_nesting_it_has_alone(moe, tmp_path):
    """Two adapters on different expert parameters: the second one's file keys are those of a model holding it alone
    (no `base_layer` step for a wrapper it is not in), so the real peft loads it into a fresh model."""
    model = oxpeft.get_peft_model(copy.deepcopy(moe), _config(oxpeft, init_lora_weights=False))
    torch.manual_seed(4)
    model.add_adapter("gate", _config(oxpeft, target_parameters=["mlp.experts.gate_up_proj"], init_lora_weights=False))
    model.set_adapter("gate")
    model.eval()
    with torch.no_grad():
        want = model(_ids()).logits
    model.save_pretrained(tmp_path / "saved", selected_adapters=["gate"])
    keys = load_file(tmp_path / "saved" / "gate" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.experts.lora_A.weight" in keys
    assert not any(".base_layer." in k for k in keys)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(moe), tmp_path / "saved" / "gate").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, want, rtol=0, atol=1e-6)
    model.load_adapter(tmp_path / "saved" / "gate", adapter_name="again")
    model.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, want, rtol=0, atol=1e-6)
