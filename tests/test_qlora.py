"""QLoRA: LoRA and DoRA on oxpeft's own 4-bit / 8-bit layers, no bitsandbytes involved."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import oxpeft
from conftest import logits, make_llama, twin
from oxpeft import Linear4bit, Linear8bit, QuantizationConfig, quantize_model


def _quantized_llama(bits: int = 4, compute_dtype=torch.float32):
    config = (
        QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype)
        if bits == 4
        # Threshold 0: every column in float against the dequantised weight, so the dense twin is exact.
        else QuantizationConfig(load_in_8bit=True, bnb_4bit_compute_dtype=compute_dtype, llm_int8_threshold=0.0)
    )
    return quantize_model(make_llama(), config)


def _dequantized_twin(model):
    """A dense copy whose Linear layers hold exactly the dequantised weights."""
    dense = twin(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, (Linear4bit, Linear8bit)):
            parent = dense.get_submodule(name.rpartition(".")[0])
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize().float()
            setattr(parent, name.rpartition(".")[2], linear)
    return dense


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_quantized_layers_equals_lora_on_dequantized_weights(bits, use_dora, input_ids):
    quantized = _quantized_llama(bits)
    dense = _dequantized_twin(quantized)
    config = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(5)
    q_model = oxpeft.get_peft_model(quantized, oxpeft.LoraConfig(**config))
    torch.manual_seed(5)
    d_model = oxpeft.get_peft_model(dense, oxpeft.LoraConfig(**config))
    target = q_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(target.base_layer, Linear4bit if bits == 4 else Linear8bit)
    torch.testing.assert_close(logits(q_model, input_ids), logits(d_model, input_ids), atol=1e-5, rtol=1e-5)


def test_qlora_training_lowers_loss_and_counts_unpacked_parameters():
    model = oxpeft.prepare_model_for_kbit_training(_quantized_llama(4, torch.bfloat16))
    model = oxpeft.get_peft_model(model, oxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, total = model.get_nb_trainable_parameters()
    dense_total = sum(p.numel() for p in make_llama().parameters())
    assert total == dense_total + trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_merge_and_unload_gives_full_precision_layers(input_ids):
    model = oxpeft.get_peft_model(
        _quantized_llama(4), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    assert isinstance(merged.model.layers[0].self_attn.k_proj, Linear4bit)  # untouched layers stay quantised
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_requantizing_merge_warns_and_stays_4bit(input_ids):
    model = oxpeft.get_peft_model(
        _quantized_llama(4), oxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    expected = logits(model, input_ids)
    with pytest.warns(UserWarning, match="requantises"):
        merged = model.merge_and_unload(requantize=True)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
    out = logits(merged, input_ids)
    assert not torch.equal(out, expected)  # rounded to the 4-bit grid ...
    torch.testing.assert_close(out, expected, atol=0.5, rtol=0.1)  # ... but close


def test_qlora_adapter_loads_in_peft_on_the_dense_model(tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    quantized = _quantized_llama(4)
    dense = _dequantized_twin(quantized)
    model = oxpeft.get_peft_model(quantized, oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(dense, str(tmp_path))
    torch.testing.assert_close(logits(theirs, input_ids), logits(model, input_ids), atol=1e-5, rtol=1e-5)
