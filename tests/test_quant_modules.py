"""oxpeft's quantised torch modules: torch-op path == Rust path, forward semantics, state-dict
interchange with bitsandbytes, model-level quantisation and loading, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_llama
from oxpeft.quant import (
    Linear4bit,
    Linear8bit,
    QuantizationConfig,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
)
from oxpeft.quant import functional as Q

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[:130] = 0.0
    return w.to(dtype)


# ---------------------------------------------------------------- torch-op path == Rust path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_op_path_equals_rust_path(dtype, quant_type):
    for i, (shape, blocksize) in enumerate([((64, 64), 64), ((33, 17), 32), ((300, 129), 256), ((5,), 4096), ((8, 600), 128)]):
        w = _weight(shape, dtype, seed=i)
        packed, state = Q.quantize_4bit(w, blocksize, quant_type, compress_statistics=True)
        t_packed, t_absmax = Q._quantize_4bit_torch(w.reshape(-1), blocksize, quant_type)
        assert torch.equal(packed.view(-1), t_packed)
        plain = Q.quantize_4bit(w, blocksize, quant_type, compress_statistics=False)[1].absmax
        assert torch.equal(_bits(plain), _bits(t_absmax))
        codes, nested = Q._double_quantize_torch(t_absmax, state.nested_offset)
        assert torch.equal(codes, state.absmax) and torch.equal(_bits(nested), _bits(state.nested_absmax))
        scales = Q._block_scales_torch(state.absmax, state.nested_absmax, state.nested_quant_map, state.nested_offset)
        assert torch.equal(_bits(scales), _bits(state.block_scales()))
        for out_dtype in DTYPES:
            rust = Q.dequantize_4bit(packed, state, out_dtype)
            torch_path = Q._dequantize_4bit_torch(packed, scales, state.numel, blocksize, state.quant_map, out_dtype)
            assert torch.equal(_bits(rust), _bits(torch_path)), (shape, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_torch_op_path_equals_rust_path(dtype):
    w = _weight((40, 72), dtype, seed=3)
    cb, scb = Q.quantize_int8(w)
    t_cb, t_scb = Q._quantize_int8_torch(w.to(torch.float16))
    assert torch.equal(cb, t_cb) and torch.equal(_bits(scb), _bits(t_scb))
    for out_dtype in DTYPES:
        assert torch.equal(_bits(Q.dequantize_int8(cb, scb, out_dtype)), _bits(Q._dequantize_int8_torch(cb, scb, out_dtype)))


# ---------------------------------------------------------------- module behaviour


@pytest.mark.parametrize("cls", [Linear4bit, Linear8bit])
def test_forward_is_the_dequantised_matmul_with_grad_to_the_input(cls):
    torch.manual_seed(0)
    linear = nn.Linear(48, 24).to(torch.bfloat16)
    module = cls.from_linear(linear)
    assert (module.in_features, module.out_features) == (48, 24)
    assert not module.weight.requires_grad
    x = torch.randn(2, 3, 48, dtype=torch.float32, requires_grad=True)
    y = module(x)
    assert y.dtype == torch.float32
    expected = nn.functional.linear(x.detach().to(torch.bfloat16), module.dequantize(), module.bias.to(torch.bfloat16)).float()
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert module.weight.grad is None
    w = module.dequantize()
    assert w.shape == (24, 48) and w.dtype == torch.bfloat16
    assert (w.float() - linear.weight.float()).abs().max() < 0.17 * linear.weight.float().abs().max()


def test_dtype_casts_keep_the_quantisation_state_exact():
    module = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.to(torch.bfloat16)
    module.half()
    after = module.state_dict()
    for key, value in before.items():
        if key != "bias":
            assert torch.equal(after[key], value), key
    assert module.quant_state.nested_absmax.dtype == torch.float32
    m8 = Linear8bit.from_linear(nn.Linear(64, 32)).half()
    assert m8.SCB.dtype == torch.float32 and m8.weight.dtype == torch.int8


def test_state_dict_keys_and_metadata_follow_bitsandbytes():
    module = Linear4bit.from_linear(nn.Linear(64, 32).to(torch.bfloat16), quant_type="nf4")
    sd = module.state_dict()
    assert sorted(sd) == sorted(
        [
            "weight",
            "bias",
            "weight.absmax",
            "weight.quant_map",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4",
        ]
    )
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]
    assert meta["shape"] == [32, 64] and meta["dtype"] == "bfloat16"
    plain = Linear4bit.from_linear(nn.Linear(64, 32), quant_type="fp4", compress_statistics=False).state_dict()
    assert "weight.nested_absmax" not in plain and plain["weight.absmax"].dtype == torch.float32
    assert "weight.quant_state.bitsandbytes__fp4" in plain
    sd8 = Linear8bit.from_linear(nn.Linear(64, 32)).state_dict()
    assert sorted(sd8) == ["SCB", "bias", "weight", "weight_format"]
    assert sd8["weight_format"].dtype == torch.uint8 and sd8["weight_format"].item() == 0


def test_state_dict_round_trip_and_device_meta_construction():
    source = Linear4bit.from_linear(nn.Linear(40, 24), quant_type="fp4", blocksize=32)
    target = Linear4bit(40, 24, compute_dtype=torch.float32, device="meta")
    target.load_state_dict(source.state_dict())
    assert target.quant_type == "fp4" and target.blocksize == 32
    assert torch.equal(target.dequantize(), source.dequantize())
    # Packed bytes stored in a wider dtype (bitsandbytes' quant_storage) load too.
    wide = dict(source.state_dict())
    wide["weight"] = wide["weight"].view(-1).view(torch.bfloat16).reshape(-1, 1)
    target.load_state_dict(wide)
    assert torch.equal(target.dequantize(), source.dequantize())
    s8 = Linear8bit.from_linear(nn.Linear(40, 24))
    t8 = Linear8bit(40, 24, compute_dtype=torch.float32, device="meta")
    t8.load_state_dict(s8.state_dict())
    assert torch.equal(t8.dequantize(), s8.dequantize())


bnb = None
try:  # bitsandbytes is a test oracle only
    import bitsandbytes as bnb  # noqa: F811
except Exception:  # pragma: no cover - depends on the platform
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes does not import here")


@needs_bnb
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_checkpoints_move_both_ways_with_bitsandbytes_linear4bit(quant_type, nested):
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    theirs = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantises on the move
    x = torch.randn(4, 64)
    # bitsandbytes -> oxpeft
    ours = Linear4bit(64, 32, compute_dtype=torch.float32, device="meta")
    ours.load_state_dict(theirs.state_dict())
    assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    # oxpeft -> bitsandbytes
    mine = Linear4bit.from_linear(linear, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested)
    sd = mine.state_dict()
    # The way transformers loads a pre-quantised 4-bit checkpoint into bitsandbytes.
    fresh = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested)
    fresh.weight = bnb.nn.Params4bit.from_prequantized(
        data=sd["weight"], quantized_stats={k: v for k, v in sd.items() if k.startswith("weight.")}, device="cpu", module=fresh
    )
    fresh.bias = nn.Parameter(sd["bias"])
    assert torch.equal(fresh.weight.data, mine.weight.data)
    assert torch.allclose(fresh(x), mine(x), atol=1e-5, rtol=1e-5)


@needs_bnb
def test_checkpoints_move_both_ways_with_bitsandbytes_linear8bit():
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    theirs = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    ours = Linear8bit(64, 32, compute_dtype=torch.float32, device="meta")
    ours.load_state_dict(theirs.state_dict())
    mine = Linear8bit.from_linear(linear, compute_dtype=torch.float32)
    for key, value in theirs.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key
    assert torch.equal(ours.dequantize(), mine.dequantize())
    back = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    back.load_state_dict(linear.state_dict())
    back = back.to("cpu")
    back.load_state_dict(mine.state_dict())
    assert torch.equal(back.weight.data, mine.weight.data)


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Linear4bit(64, 32, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(64, 32, quant_type="int4")
    bad = nn.Linear(64, 32)
    with torch.no_grad():
        bad.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight: input holds NaN or Inf in block 3"):
        Linear4bit.from_linear(bad, name="layers.0.q_proj.weight")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Linear8bit.from_linear(bad)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        Q.quantize_4bit(torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_int8(torch.ones(64))
    # Odd shapes are fine: blocks cross rows and the last byte is half used.
    odd = nn.Linear(17, 33)
    module = Linear4bit.from_linear(odd, compute_dtype=torch.float32, blocksize=32)
    assert module.weight.shape == ((17 * 33 + 1) // 2, 1)
    assert (module.dequantize() - odd.weight).abs().max() < 0.1
    # A checkpoint for another shape, or a corrupt quant state, names the module.
    state = Linear4bit.from_linear(nn.Linear(64, 32)).state_dict()
    with pytest.raises(RuntimeError, match=r"proj: quantised shape \[32, 64\] does not match"):
        nn.ModuleDict({"proj": Linear4bit(32, 64)}).load_state_dict({f"proj.{k}": v for k, v in state.items()})
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="does not hold UTF-8 JSON"):
        Linear4bit(64, 32).load_state_dict(state)
    with pytest.raises(ValueError, match="finite"):
        Q.dequantize_4bit(*_nan_scaled_state())
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        QuantizationConfig(bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="cannot both be True"):
        QuantizationConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="unknown field"):
        QuantizationConfig.from_dict({"load_in_4bit": True, "bnb_4bit_quant_typo": "nf4"})


def _nan_scaled_state():
    packed, state = Q.quantize_4bit(torch.ones(128), 64, "nf4", compress_statistics=False)
    state.absmax = torch.tensor([1.0, float("nan")])
    return packed, state


# ---------------------------------------------------------------- models


def _tiny_llama(tie=False):
    return make_llama(tie_word_embeddings=tie).to(torch.bfloat16)


def test_quantization_config_accepts_bitsandbytes_config():
    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["mlp.down_proj"],
    )
    config = QuantizationConfig.from_bitsandbytes_config(bnb_config)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.compute_dtype == torch.bfloat16 and config.skip_modules == ["mlp.down_proj"]
    assert QuantizationConfig(load_in_8bit=True).load_in_4bit is False
    assert QuantizationConfig(bnb_4bit_compute_dtype="float16").compute_dtype == torch.float16


def test_quantize_model_replaces_linears_except_lm_head_and_skipped():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits.float()
    quantize_model(model, QuantizationConfig(skip_modules=["mlp.down_proj"]))
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)
    assert model.is_loaded_in_4bit
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().mean() < 0.2 * reference.abs().mean()


def test_quantize_model_changes_nothing_on_error():
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        quantize_model(model, QuantizationConfig())
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in model.modules())
    with pytest.raises(ValueError, match="match no Linear layer"):
        quantize_model(_tiny_llama(), QuantizationConfig(skip_modules=["mlp.down_prj"]))


@pytest.mark.parametrize("load_in_8bit", [False, True])
def test_load_quantized_equals_quantize_model(tmp_path, load_in_8bit):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "bf16")
    config = QuantizationConfig(load_in_8bit=load_in_8bit)
    loaded = load_quantized(tmp_path / "bf16", config)
    from transformers import LlamaForCausalLM

    # transformers' own bf16 load, quantised afterwards, is the reference.
    expected = quantize_model(LlamaForCausalLM.from_pretrained(tmp_path / "bf16").eval(), config)
    assert set(loaded.state_dict()) == set(expected.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    # A checkpoint saved already quantised loads back without requantising.
    from safetensors.torch import save_file

    (tmp_path / "q").mkdir()
    model.config.save_pretrained(tmp_path / "q")
    save_file({k: v.contiguous() for k, v in expected.state_dict().items()}, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    again = load_quantized(tmp_path / "q", config)
    for key, value in expected.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_load_quantized_reads_sharded_checkpoints(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = load_quantized(tmp_path / "sharded", QuantizationConfig(bnb_4bit_quant_type="fp4", blocksize=128))
    expected = quantize_model(model, QuantizationConfig(bnb_4bit_quant_type="fp4", blocksize=128))
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_quantized_tied_embeddings_and_missing_files(tmp_path):
    model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "tied")
    loaded = load_quantized(tmp_path / "tied", QuantizationConfig())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "empty").mkdir()
        model.config.save_pretrained(tmp_path / "empty")
        load_quantized(tmp_path / "empty", QuantizationConfig())


def test_prepare_model_for_kbit_training_trains_through_checkpointing():
    model = quantize_model(_tiny_llama(), QuantizationConfig())
    model.train()
    prepare_model_for_kbit_training(model, upcast_norms=True)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16, "no blanket fp32 upcast"
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    trainable = model.model.layers[1].post_attention_layernorm.weight
    trainable.requires_grad_(True)
    ids = torch.randint(0, 256, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert trainable.grad is not None and torch.isfinite(trainable.grad).all()


def test_load_quantized_rejects_corrupt_checkpoints(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*' .* do not fit"):
        load_quantized(tmp_path / "m", QuantizationConfig())
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match=r"model\.safetensors: header length"):
        load_quantized(tmp_path / "m", QuantizationConfig())
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * header_len + data[8 + header_len :])
    with pytest.raises(ValueError, match="header is not UTF-8 JSON"):
        load_quantized(tmp_path / "m", QuantizationConfig())


def test_dequantize_into_a_reused_buffer():
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    packed, state = Q.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    expected = Q.dequantize_4bit(packed, state)
    out = torch.full_like(expected, float("nan"))
    assert Q.dequantize_4bit(packed, state, out=out) is out
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        Q.dequantize_4bit(packed, state, out=torch.empty(64, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        Q.dequantize_4bit(packed, state, out=torch.empty(64, 96, dtype=torch.bfloat16).T)


# ---------------------------------------------------------------- autograd: no full-precision weight kept


@pytest.fixture(params=["rust", "torch-ops"])
def kernel_path(request, monkeypatch):
    """Runs a test on the Rust kernels and again on the torch-op path (what CUDA and other devices use)."""
    if request.param == "torch-ops":
        monkeypatch.setattr(Q, "_use_native", lambda t: False)
    return request.param


def _saved_tensor_sizes(fn):
    """Runs `fn` and returns the element counts of every tensor autograd saved for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("cls", [Linear4bit, Linear8bit])
def test_backward_dequantises_again_instead_of_keeping_the_weight(cls, kernel_path):
    torch.manual_seed(1)
    module = cls.from_linear(nn.Linear(96, 80), compute_dtype=torch.float32)
    module.bias.requires_grad_(True)
    x = torch.randn(2, 5, 96, requires_grad=True)
    y, sizes = _saved_tensor_sizes(lambda: module(x))
    assert 96 * 80 not in sizes, "the dequantised weight must not be saved for backward"
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # The same products through a plain Linear holding the dequantised weight.
    w = module.dequantize().detach().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = module.bias.detach().clone().requires_grad_(True)
    y2 = nn.functional.linear(x2, w, b2)
    y2.backward(grad_out)
    assert torch.equal(y.detach(), y2.detach())
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(module.bias.grad, b2.grad, atol=1e-6, rtol=1e-6)
    assert module.weight.grad is None


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_quantised_layers_train_under_activation_checkpointing(use_reentrant, kernel_path):
    torch.manual_seed(2)
    block = nn.Sequential(
        Linear4bit.from_linear(nn.Linear(64, 96), compute_dtype=torch.bfloat16),
        nn.GELU(),
        Linear8bit.from_linear(nn.Linear(96, 64), compute_dtype=torch.bfloat16, threshold=2.0),
    )
    x = torch.randn(3, 64) * 2
    x[:, 5] = 4.0  # an outlier column for the 8-bit layer
    grads = []
    for checkpointed in (False, True):
        xi = x.clone().requires_grad_(True)
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(block, xi, use_reentrant=use_reentrant)
        else:
            y = block(xi)
        y.pow(2).sum().backward()
        grads.append(xi.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------- LLM.int8() outlier threshold


def _activations(tokens=12, features=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, 7] = 9.0  # a whole outlier column
    x[3, 30] = -7.5  # a single outlier
    x[5] = 0.0  # an all-zero row
    return x


def test_int8_threshold_zero_is_the_dequantised_matmul_and_positive_uses_int8(kernel_path):
    torch.manual_seed(3)
    linear = nn.Linear(96, 40)
    x = _activations()
    plain = Linear8bit.from_linear(linear, compute_dtype=torch.float32)
    assert torch.equal(plain(x), nn.functional.linear(x, plain.dequantize(), plain.bias))
    mixed = Linear8bit.from_linear(linear, compute_dtype=torch.float32, threshold=6.0)
    y = mixed(x)
    # By hand: outlier columns 7 and 30 in float, every other column through int8 activations.
    cols = torch.tensor([7, 30])
    rest = torch.ones(96, dtype=torch.bool)
    rest[cols] = False
    a = x.half().float() * rest
    row_max = a.abs().amax(1)
    ca = torch.round(a * torch.where(row_max > 0, 127 / row_max, 0).unsqueeze(1))
    expected = (ca @ mixed.weight.float().t()) * row_max.unsqueeze(1) * mixed.SCB.unsqueeze(0) / 127**2
    expected = expected + mixed.bias + x[:, cols] @ mixed.dequantize()[:, cols].t()
    # Same terms, fp32 products and sums in another order: a few ulps of outputs around 3.
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    # Quantising the activations costs accuracy against the float matmul, within LLM.int8()'s usual error.
    assert (y - plain(x)).abs().max() < 0.05 * plain(x).abs().max()


def test_int8_matmul_fallback_is_exact():
    from oxpeft.quant.linear8bit import _int8_matmul, _int8_matmul_fallback

    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (9, 2500), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (33, 2500), generator=g, dtype=torch.int8)
    a[0], b[0] = 127, 127  # 2500 * 127**2 > 2**24: a single fp32 product would round
    exact = (a.long() @ b.long().t()).to(torch.int32)
    assert torch.equal(_int8_matmul_fallback(a, b), exact)
    assert torch.equal(_int8_matmul(a, b), exact)


def test_llm_int8_threshold_reaches_the_layers():
    from transformers import BitsAndBytesConfig

    config = QuantizationConfig.from_bitsandbytes_config(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.5))
    assert config.llm_int8_threshold == 4.5
    assert BitsAndBytesConfig(load_in_8bit=True).llm_int8_threshold == 6.0  # carried over by from_bitsandbytes_config
    assert QuantizationConfig(load_in_8bit=True).llm_int8_threshold == 6.0  # the same default
    model = quantize_model(_tiny_llama(), config)
    assert model.model.layers[0].mlp.up_proj.threshold == 4.5
    assert "threshold=4.5" in repr(model.model.layers[0].mlp.up_proj)
    assert QuantizationConfig.from_dict(config.to_dict()).llm_int8_threshold == 4.5


def test_more_bad_input_gets_a_clear_error():
    m4 = Linear4bit.from_linear(nn.Linear(64, 32))
    m8 = Linear8bit.from_linear(nn.Linear(64, 32))
    for module in (m4, m8):
        with pytest.raises(ValueError, match=r"\(in_features=64, out_features=32\): input of shape \[2, 63\] does not end in 64"):
            module(torch.randn(2, 63))
    with pytest.raises(ValueError, match="features must be positive"):
        Linear4bit(0, 32)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        Linear8bit(64, 32, threshold=-1.0)
    with pytest.raises(ValueError, match="llm_int8_threshold must be a finite number >= 0"):
        QuantizationConfig(load_in_8bit=True, llm_int8_threshold=float("nan"))
    with pytest.raises(ValueError, match="cannot quantise an empty tensor"):
        Q.quantize_4bit(torch.ones(0))
    packed, state = Q.quantize_4bit(torch.randn(96, 64), 64, "nf4", compress_statistics=False)
    with pytest.raises(ValueError, match=r"packed weight must be uint8 with 3072 bytes for shape \[96, 64\]"):
        Q.dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError, match="int8 CB"):
        Q.dequantize_int8(m8.weight, m8.SCB[:-1])
    with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
        Q.set_output_pool_limit(-1)
    # Corrupt scales in a checkpoint are refused at load time, naming the module, and change nothing.
    state4 = m4.state_dict()
    state4["weight.nested_absmax"] = torch.full_like(state4["weight.nested_absmax"], float("inf"))
    target = nn.ModuleDict({"proj": Linear4bit(64, 32)})
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="proj: nested_absmax holds NaN or Inf"):
        target.load_state_dict({f"proj.{k}": v for k, v in state4.items()})
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    state8 = m8.state_dict()
    state8["SCB"] = state8["SCB"].clone()
    state8["SCB"][3] = float("nan")
    with pytest.raises(RuntimeError, match="SCB holds a negative, NaN or Inf row scale"):
        Linear8bit(64, 32).load_state_dict(state8)


def test_fresh_outputs_are_pooled_and_correct():
    torch.manual_seed(6)
    w = torch.randn(1024, 1024)
    packed, state = Q.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    previous = Q.set_output_pool_limit(64 << 20)
    try:
        first = Q.dequantize_4bit(packed, state, torch.float32)  # 4 MiB: a pooled buffer
        expected = first.clone()
        address = first.data_ptr()
        del first  # its buffer returns to the pool ...
        second = Q.dequantize_4bit(packed, state, torch.float32)
        assert second.data_ptr() == address  # ... and the next output of that size reuses it
        assert torch.equal(second, expected)
        assert torch.equal(second, Q._dequantize_4bit_torch(packed, state.block_scales(), state.numel, 64, state.quant_map, torch.float32).view(1024, 1024))
        alive = Q.dequantize_4bit(packed, state, torch.float32)  # while `second` lives, another buffer
        assert alive.data_ptr() != second.data_ptr() and torch.equal(alive, expected)
        Q.set_output_pool_limit(0)
        del second, alive
        assert _native_pool_bytes() == 0
    finally:
        Q.set_output_pool_limit(previous)


def _native_pool_bytes() -> int:
    from oxpeft import _native

    return _native.output_pool_bytes()
