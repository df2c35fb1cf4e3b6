"""LoftQ: the Rust loop through its binding, LoftQConfig, loftq_initialize and
replace_lora_weights_loftq, checked against a torch reference of the same loop built from
bitsandbytes' NF4 and HF PEFT's own SVD step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from oxpeft import _native
from oxpeft.loftq import LoftQConfig, loftq_initialize, replace_lora_weights_loftq


def weight_matrix(rows: int, cols: int, low_rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Gaussian noise plus a low-rank part with a decaying spectrum, like a pretrained weight."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, low_rank, generator=g)
    right = torch.randn(low_rank, cols, generator=g) / torch.arange(1, low_rank + 1).unsqueeze(1)
    return 0.02 * torch.randn(rows, cols, generator=g) + 0.01 * left @ right


def nf4_roundtrip(x: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """bitsandbytes' own NF4 quantise + dequantise (CPU backend): the quantiser PEFT's LoftQ uses."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    # Flat, as bitsandbytes' CUDA kernels see any tensor: blocks run across row ends. (Its CPU
    # dequantize_4bit treats 2-D input whose rows are not a whole number of blocks differently.)
    packed, state = bnb_functional.quantize_4bit(x.reshape(-1), blocksize=blocksize, quant_type="nf4")
    return bnb_functional.dequantize_4bit(packed, state).reshape(x.shape)


def reference_loftq(weight: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's loop with bitsandbytes NF4 and PEFT's SVD step (torch.linalg.svd), scaling 1."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    res = weight.clone()
    for i in range(iters):
        dequantized = nf4_roundtrip(res)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=rank)
        lora_b, lora_a = out["L"][:, :rank], out["R"][:rank]
        if i + 1 < iters:
            res = weight - lora_b @ lora_a
    return dequantized, lora_a, lora_b


def rel_error(weight: torch.Tensor, dequantized: torch.Tensor, delta: torch.Tensor | None = None) -> float:
    approx = dequantized if delta is None else dequantized + delta
    return (torch.linalg.norm(weight - approx) / torch.linalg.norm(weight)).item()


# ---------------------------------------------------------------- binding


def test_binding_shapes_and_reported_error() -> None:
    w = weight_matrix(48, 80).numpy()
    deq, lora_a, lora_b, err = _native.loftq_init(w, 6, 2, 2.0)
    assert deq.shape == (48, 80) and lora_a.shape == (6, 80) and lora_b.shape == (48, 6)
    assert deq.dtype == lora_a.dtype == lora_b.dtype == np.float32
    direct = np.linalg.norm(w - deq - 2.0 * lora_b @ lora_a) / np.linalg.norm(w)
    assert err == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be at least 1"),
        ({"rank": 49}, "rank 49 is larger than min(rows, cols) = 48"),
        ({"iters": 0}, "loftq_iter must be at least 1"),
        ({"bits": 2}, "loftq_bits must be 4 (NF4 / FP4) or 8 (int8), got 2"),
        ({"quant_type": "int4"}, "quant_type must be 'nf4' or 'fp4'"),
        ({"scaling": -1.0}, "scaling must be a positive finite number"),
    ],
)
def test_binding_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"rank": 4, "iters": 1, "scaling": 1.0} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _native.loftq_init(weight_matrix(48, 80).numpy(), **args)


def test_binding_rejects_bad_arrays() -> None:
    w = weight_matrix(16, 24).numpy()
    with pytest.raises(ValueError, match="2-D float32"):
        _native.loftq_init(w.astype(np.float64), 2, 1, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.loftq_init(w.T, 2, 1, 1.0)
    w[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value \(NaN\) at row 3, column 5"):
        _native.loftq_init(w, 2, 1, 1.0)


# ---------------------------------------------------------------- against the reference loop


@pytest.mark.parametrize("iters", [1, 3])
def test_exact_mode_equals_reference_torch_loop(iters: int) -> None:
    w = weight_matrix(96, 160, seed=iters)
    ref_deq, ref_a, ref_b = reference_loftq(w, rank=8, iters=iters)
    deq, lora_a, lora_b, err = _native.loftq_init(w.numpy(), 8, iters, 1.0, exact_svd=True)
    deq, delta = torch.from_numpy(deq), torch.from_numpy(lora_b @ lora_a)
    if iters == 1:
        assert torch.equal(deq, ref_deq)
    else:
        # Later iterations quantise W - B @ A, whose fp32 rounding differs between the two SVDs:
        # block absmaxes move by an ulp and a few values cross an NF4 decision boundary.
        flipped = (deq - ref_deq).abs() > 1e-4 * ref_deq.abs().max()
        assert flipped.float().mean().item() < 0.01
    ref_delta = ref_b @ ref_a
    assert torch.linalg.norm(delta - ref_delta) <= 1e-2 * torch.linalg.norm(ref_delta)
    assert err == pytest.approx(rel_error(w, ref_deq, ref_delta), rel=1e-3)


@pytest.mark.parametrize(("rank", "iters"), [(4, 1), (16, 1), (16, 5)])
def test_fast_svd_within_one_percent_of_exact(rank: int, iters: int) -> None:
    w = weight_matrix(128, 192, low_rank=24, seed=7).numpy()
    *_, fast = _native.loftq_init(w, rank, iters, 1.0)
    *_, exact = _native.loftq_init(w, rank, iters, 1.0, exact_svd=True)
    assert abs(fast - exact) <= 0.01 * exact


def test_t1_base_is_plain_bitsandbytes_nf4_and_error_falls_with_rank_and_iterations() -> None:
    w = weight_matrix(96, 128, low_rank=16, seed=3)
    plain = nf4_roundtrip(w)
    errors = {}
    for rank, iters in [(4, 1), (16, 1), (16, 5)]:
        deq, lora_a, lora_b, err = _native.loftq_init(w.numpy(), rank, iters, 1.0)
        if iters == 1:
            assert torch.equal(torch.from_numpy(deq), plain)
        errors[rank, iters] = err
    plain_error = rel_error(w, plain)
    assert errors[4, 1] < plain_error
    assert errors[16, 1] < errors[4, 1]
    assert errors[16, 5] < errors[16, 1]


@pytest.mark.parametrize(("bits", "quant_type"), [(4, "fp4"), (8, "nf4")])
def test_fp4_and_int8_beat_their_plain_quantisation(bits: int, quant_type: str) -> None:
    w = weight_matrix(64, 96, seed=11).numpy()
    deq, *_ = _native.loftq_init(w, 8, 1, 1.0, bits=bits, quant_type=quant_type)
    plain_error = np.linalg.norm(w - deq) / np.linalg.norm(w)
    *_, err = _native.loftq_init(w, 8, 1, 1.0, bits=bits, quant_type=quant_type)
    assert err < plain_error


# ---------------------------------------------------------------- LoftQConfig


def test_loftq_config_serialises_like_peft() -> None:
    peft = pytest.importorskip("peft")
    for kwargs in [{}, {"loftq_bits": 8, "loftq_iter": 5}]:
        ours = LoftQConfig(**kwargs)
        assert ours.to_dict() == vars(peft.LoftQConfig(**kwargs))
        assert LoftQConfig.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


def test_loftq_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="loftq_bits must be 4 or 8, got 2"):
        LoftQConfig(loftq_bits=2)
    with pytest.raises(ValueError, match="loftq_iter must be an integer >= 1, got 0"):
        LoftQConfig(loftq_iter=0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['loftq_bit'\]"):
        LoftQConfig.from_dict({"loftq_bit": 4})


# ---------------------------------------------------------------- loftq_initialize


def test_loftq_initialize_shapes_dtypes_and_effective_delta() -> None:
    w = weight_matrix(64, 96, seed=5)
    scaling = 16 / 8
    deq, lora_a, lora_b = loftq_initialize(w, 8, scaling, LoftQConfig(loftq_iter=2))
    assert deq.shape == w.shape and lora_a.shape == (8, 96) and lora_b.shape == (64, 8)
    assert deq.dtype == lora_a.dtype == torch.float32
    # The adapter's effective delta (scaling * B @ A) is what corrects the quantisation error.
    assert rel_error(w, deq, scaling * lora_b @ lora_a) < rel_error(w, deq)
    assert rel_error(w, deq, lora_b @ lora_a) > rel_error(w, deq, scaling * lora_b @ lora_a)

    w16 = w.to(torch.bfloat16).requires_grad_()
    deq16, a16, b16 = loftq_initialize(w16, 8, scaling, LoftQConfig())
    assert deq16.dtype == a16.dtype == b16.dtype == torch.bfloat16
    assert deq16.device == w16.device and not deq16.requires_grad
    # bf16 input goes through the same fp32 loop: the T=1 base is NF4 of the bf16 values.
    assert torch.equal(deq16, nf4_roundtrip(w16.detach().float()).to(torch.bfloat16))


def test_loftq_initialize_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match=r"2-D \(out_features, in_features\) tensor, got \(4, 4, 4\)"):
        loftq_initialize(torch.zeros(4, 4, 4), 2, 1.0, LoftQConfig())


# ---------------------------------------------------------------- replace_lora_weights_loftq


class TinyNf4Linear(nn.Module):
    """A quantised linear layer as the LoRA layer sees it: NF4 codes (oxpeft's kernels) and .dequantize()."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(weight.shape)
        packed, absmax = _native.quantize_4bit(weight.numpy().ravel(), 64, "nf4", "float32")
        self.register_buffer("packed", torch.from_numpy(packed))
        self.register_buffer("absmax", torch.from_numpy(absmax))

    def dequantize(self) -> torch.Tensor:
        n = math.prod(self.shape)
        out = _native.dequantize_4bit(self.packed.numpy(), self.absmax.numpy(), n, 64, "nf4", "float32")
        return torch.from_numpy(out).reshape(self.shape)


class TinyLoraLayer(nn.Module):
    """The duck-typed LoRA layer interface replace_lora_weights_loftq works against."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, alpha: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, out_features, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)
        self.scaling = {"default": alpha / r}


class TinyModel(nn.Module):
    base_model_prefix = "model"

    def __init__(self, weights: dict[str, torch.Tensor], r: int = 4) -> None:
        super().__init__()
        self.model = nn.ModuleDict()
        for name, w in weights.items():
            self.model[name] = TinyLoraLayer(TinyNf4Linear(w), w.shape[1], w.shape[0], r, alpha=2 * r)
        self.model["plain"] = TinyLoraLayer(nn.Linear(8, 8), 8, 8, r, alpha=r)  # not quantised: left alone


def original_weights() -> dict[str, torch.Tensor]:
    return {"q_proj": weight_matrix(32, 64, seed=21), "down_proj": weight_matrix(64, 32, seed=22)}


def effective_error(layer: TinyLoraLayer, weight: torch.Tensor) -> float:
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return rel_error(weight, layer.base_layer.dequantize(), delta.detach())


@pytest.mark.parametrize("layout", ["single", "sharded", "no_prefix"])
def test_replace_lora_weights_loftq_reads_the_checkpoint(tmp_path, layout: str) -> None:
    weights = original_weights()
    model = TinyModel(weights)
    plain_before = model.model["plain"].lora_A["default"].weight.clone()
    if layout == "single":
        save_file({f"model.{k}.weight": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    elif layout == "no_prefix":  # checkpoints of the bare model carry no base_model_prefix
        save_file({f"{k}.weight": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    else:
        weight_map = {}
        for i, (k, v) in enumerate(weights.items()):
            shard = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({f"model.{k}.weight": v}, str(tmp_path / shard))
            weight_map[f"model.{k}.weight"] = shard
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    replace_lora_weights_loftq(model, model_path=str(tmp_path))
    for name, w in weights.items():
        layer = model.model[name]
        assert effective_error(layer, w) < rel_error(w, layer.base_layer.dequantize())
        # Exactly LoftQ's SVD step on W - deq(Q) of the existing base.
        lora_a, lora_b, _ = _native.loftq_fit_fixed_base(
            w.numpy(), layer.base_layer.dequantize().numpy(), 4, layer.scaling["default"]
        )
        assert torch.equal(layer.lora_A["default"].weight, torch.from_numpy(lora_a))
        assert torch.equal(layer.lora_B["default"].weight, torch.from_numpy(lora_b))
    assert torch.equal(model.model["plain"].lora_A["default"].weight, plain_before)


def test_replace_lora_weights_loftq_callback_can_roll_back(tmp_path) -> None:
    weights = original_weights()
    save_file({f"model.{k}.weight": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    model = TinyModel(weights)
    before = {k: model.model[k].lora_A["default"].weight.clone() for k in weights}
    seen = []

    def keep_only_q_proj(m: nn.Module, name: str) -> bool:
        assert m is model
        seen.append(name)
        return name.endswith("q_proj")

    replace_lora_weights_loftq(model, model_path=str(tmp_path / "model.safetensors"), callback=keep_only_q_proj)
    assert seen == ["model.q_proj", "model.down_proj"]
    assert not torch.equal(model.model["q_proj"].lora_A["default"].weight, before["q_proj"])
    assert torch.equal(model.model["down_proj"].lora_A["default"].weight, before["down_proj"])
    assert torch.count_nonzero(model.model["down_proj"].lora_B["default"].weight) == 0


def test_replace_lora_weights_loftq_errors(tmp_path) -> None:
    weights = original_weights()
    model = TinyModel(weights)
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="pass model_path"):
        replace_lora_weights_loftq(model)
    save_file({"model.q_proj.weight": weights["q_proj"]}, str(tmp_path / "model.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match="layer 'model.down_proj'"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))
    # Checked before any layer changes: q_proj, which the checkpoint does hold, is untouched too.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no LoRA layer of adapter 'other'"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path), adapter_name="other")
    save_file({f"model.{k}.weight": v.T.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    shape_error = r"layer 'model.q_proj': checkpoint tensor 'model.q_proj.weight' has shape \(64, 32\)"
    with pytest.raises(ValueError, match=shape_error):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))


def test_replace_lora_weights_loftq_on_a_real_quantised_peft_model(tmp_path) -> None:
    """A transformers Llama saved as safetensors, loaded NF4-quantised by oxpeft, wrapped with LoRA:
    after replace_lora_weights_loftq every layer's deq(Q) + scaling * B @ A is closer to the checkpoint
    weight, and the model's logits move towards the full-precision model's."""
    from conftest import make_llama

    from oxpeft import LoraConfig, get_peft_model
    from oxpeft.quant import QuantizationConfig, load_quantized

    original = make_llama(seed=3)
    original.save_pretrained(tmp_path, safe_serialization=True)
    quantised = load_quantized(tmp_path, QuantizationConfig(bnb_4bit_compute_dtype=torch.float32))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=True)
    model = get_peft_model(quantised, config)
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = original(input_ids=input_ids).logits
        before = (model(input_ids=input_ids).logits - reference).norm()

    replace_lora_weights_loftq(model, model_path=str(tmp_path))

    state = original.state_dict()
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 3 * 2
    for name, layer in layers:
        w = state[name.removeprefix("base_model.model.") + ".weight"]
        assert effective_error(layer, w) < rel_error(w, layer.base_layer.dequantize())
    with torch.no_grad():
        after = (model(input_ids=input_ids).logits - reference).norm()
    assert after < before


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantized_base_requantises_to_itself_in_linear4bit(quant_type: str) -> None:
    """deq(Q) re-quantises to the same codes and scales, so an oxpeft Linear4bit built from the
    returned weight (without double quantisation) holds exactly the base the loop optimised for."""
    from oxpeft.quant import Linear4bit

    w = weight_matrix(48, 96, seed=13)
    deq, *_ = loftq_initialize(w, 8, 2.0, LoftQConfig(loftq_iter=3), quant_type=quant_type)
    linear = nn.Linear(96, 48, bias=False)
    linear.weight.data.copy_(deq)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(layer.dequantize(), deq)
