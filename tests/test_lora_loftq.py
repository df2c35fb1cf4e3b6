"""init_lora_weights="loftq": quantised base layers and LoftQ-fitted adapters in one call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oxpeft
from conftest import logits, make_llama, twin
from oxpeft import Linear4bit, Linear8bit
from oxpeft.loftq import LoftQConfig

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _loftq_model(bits: int, iters: int = 1):
    config = oxpeft.LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters),
    )
    return oxpeft.get_peft_model(make_llama(), config)


def _relative_error(model, reference, x):
    out, ref = logits(model, x), logits(reference, x)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits, layer_type", [(4, Linear4bit), (8, Linear8bit)])
def test_loftq_quantises_the_base_and_beats_plain_quantisation(bits, layer_type, input_ids):
    reference = make_llama()
    model = _loftq_model(bits)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, layer_type)
    assert model.peft_config["default"].loftq_config == {"loftq_bits": bits, "loftq_iter": 1}

    # output at init == quantised base + adapter, and closer to the full-precision model than the base alone
    with model.disable_adapter():
        quantised_only = _relative_error(model, reference, input_ids)
    with_adapter = _relative_error(model, reference, input_ids)
    assert with_adapter < quantised_only
    layer = q_proj
    w = reference.model.layers[0].self_attn.q_proj.weight
    residual_base = (w - layer.base_layer.dequantize().float()).norm()
    residual_loftq = (w - layer.base_layer.dequantize().float() - layer.get_delta_weight("default")).norm()
    assert residual_loftq < residual_base


def test_more_iterations_fit_better():
    w = make_llama().model.layers[1].mlp.up_proj.weight

    def residual(iters):
        layer = _loftq_model(4, iters).base_model.model.model.layers[1].mlp.up_proj
        return (w - layer.base_layer.dequantize().float() - layer.get_delta_weight("default")).norm().item()

    assert residual(5) < residual(1)


def test_loftq_adapter_is_a_peft_adapter(tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    model = _loftq_model(4)
    model.save_pretrained(tmp_path)
    # HF PEFT applies the adapter to the same quantised base (here as its dequantised dense weights)
    dense = twin(make_llama())
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, Linear4bit):
            parent = dense.get_submodule(name.rpartition(".")[0].removesuffix(".base_layer").rpartition(".")[0])
            leaf = name.removesuffix(".base_layer").rpartition(".")[2]
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantize().float()
            setattr(parent, leaf, linear)
    theirs = peft.PeftModel.from_pretrained(dense, str(tmp_path))
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=1e-5, rtol=1e-5)


def test_loftq_errors():
    with pytest.raises(ValueError, match="bits"):
        LoftQConfig(loftq_bits=3)
    model = _loftq_model(4)
    with pytest.raises(ValueError, match="first adapter only"):
        model.add_adapter("again", oxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq"))
