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


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_restores_the_dtype_the_model_had_before_quantisation(base_dtype, bits, input_ids):
    # The default compute dtype (bf16) differs from the model's: merged layers must come back in the model's dtype.
    config = QuantizationConfig(load_in_4bit=True) if bits == 4 else QuantizationConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    assert config.compute_dtype == torch.bfloat16
    quantized = quantize_model(make_llama().to(base_dtype), config)
    model = oxpeft.get_peft_model(quantized, oxpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == base_dtype
    out = logits(merged, input_ids)  # ran: the merged layers fit the rest of the model
    assert out.dtype == base_dtype and torch.isfinite(out).all()
    # The unmerged model computes in bf16, the merged one in the model's dtype: close, not equal.
    torch.testing.assert_close(out.float(), expected.float(), atol=0.15, rtol=0.05)


def _bnb_llama(tmp_path, **bnb_options):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    make_llama().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=BitsAndBytesConfig(**bnb_options), device_map="cpu"
        ).eval()


@pytest.mark.parametrize(
    "bnb_options",
    [
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        dict(load_in_4bit=True),
        dict(load_in_8bit=True),
    ],
    ids=["nf4-double-fp32", "fp4-defaults", "int8"],
)
def test_merge_and_unload_on_a_bitsandbytes_model_matches_peft(tmp_path, bnb_options, input_ids):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    trained = oxpeft.get_peft_model(
        _bnb_llama(tmp_path, **bnb_options), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = _saved(trained, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_bnb_llama(tmp_path, **bnb_options), adapter)
        theirs_merged = logits(theirs.merge_and_unload(), input_ids)
    ours = oxpeft.PeftModel.from_pretrained(_bnb_llama(tmp_path, **bnb_options), adapter)
    with pytest.warns(UserWarning, match="requantises"):
        merged = ours.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("bitsandbytes")  # still a bitsandbytes layer, as PEFT leaves it
    torch.testing.assert_close(logits(merged, input_ids), theirs_merged, atol=0, rtol=0)

    # After an inference forward, bitsandbytes' CPU kernels keep 4-bit weights in their own layout (with bf16
    # scales); the merge reads the file format back from the layer's state dict and still gives PEFT's result
    # up to those scales' rounding.
    unmerged = logits(trained, input_ids)
    with pytest.warns(UserWarning, match="requantises"):
        merged_after_forward = logits(trained.merge_and_unload(), input_ids)
    torch.testing.assert_close(merged_after_forward, theirs_merged, atol=0.03, rtol=0.01)
    torch.testing.assert_close(merged_after_forward, unmerged, atol=0.3, rtol=0.05)  # rounded to the grid, but close


def _saved(model, path):
    model.save_pretrained(path)
    return str(path)
