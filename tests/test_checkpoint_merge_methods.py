"""oxpeft.merge_checkpoint / unmerge_checkpoint of IA3, LoHa and LoKr adapters against HF PEFT.

The adapters are made by the real PEFT (get_peft_model + save_pretrained) with their trained
parameters perturbed (their init is an identity or a zero delta); the oracle is
PeftModel.from_pretrained(...).merge_and_unload() on a tiny Llama (with biases, so that IA3's
scaling of the bias is exercised) saved as sharded fp32 and bf16 safetensors checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import oxpeft
from conftest import TINY_LLAMA
from oxpeft.checkpoint import SIDECAR_DIR

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lokr import LoKrLayer  # noqa: E402
from peft.tuners.lycoris_utils import LycorisLayer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_checkpoint_merge import ALL_LINEAR, compare, logits, read_checkpoint, sha_per_tensor, ulp_of  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402

LLAMA = dict(TINY_LLAMA, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama checkpoints with biases (fp32 and bf16, both sharded) and a tiny GPT-2 (Conv1D)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    out = {}
    for name, dtype in [("llama32", torch.float32), ("llama16b", torch.bfloat16)]:
        llama.to(dtype).save_pretrained(root / name, max_shard_size="150KB")
        assert len(list((root / name).glob("*.safetensors"))) > 1
        out[name] = root / name
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    return out


def make_adapter(model_dir: Path, path: Path, config, seed: int = 1) -> Path:
    """A real PEFT adapter saved with save_pretrained, its trained parameters perturbed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif ".hada_" in name or ".lokr_" in name:
                p.normal_(0, 0.15)
    pm.save_pretrained(path)
    return path


def peft_merged(model_dir: Path, adapters: list[Path], dtype: torch.dtype, weights=None) -> torch.nn.Module:
    """The oracle: each adapter merged in turn with PEFT's merge_and_unload (one PeftModel cannot
    hold adapters of different types). A weight scales LoHa / LoKr's scaling; an IA3 adapter
    with a weight is PEFT's add_weighted_adapter of it alone (its vector times the weight)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    for i, adapter in enumerate(adapters):
        pm = PeftModel.from_pretrained(model, adapter, adapter_name="a")
        weight = 1.0 if weights is None else weights[i]
        name = "a"
        if weight != 1.0 and pm.peft_config["a"].peft_type == peft.PeftType.IA3:
            pm.add_weighted_adapter(["a"], [weight], "w")
            pm.set_adapter("w")
            name = "w"
        elif weight != 1.0:
            for m in pm.modules():
                if isinstance(m, LycorisLayer) and "a" in m.scaling:
                    m.scaling["a"] *= weight
        model = pm.merge_and_unload(adapter_names=[name])
    return model


def lokr_rounding_bound(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """How far apart two correct fp32 merges of a LoKr adapter may lie, per merged weight, besides
    the final rounding: torch multiplies tiny low-rank factor pairs (here 8 x r @ r x 8) without
    FMA and oxpeft with, so each factor entry may differ by twice the dot-product error bound
    r * u * (|a| @ |b|); through the Kronecker product that is at most
    4 * r * u * |scaling| * kron(|w1_a| @ |w1_b|, |w2_a| @ |w2_b|) (u = 2^-24)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter, adapter_name="a")
    bound = {}
    for name, m in pm.named_modules():
        if isinstance(m, LoKrLayer) and "a" in m.r:

            def magnitude(whole, a, b):
                return whole["a"].abs() if "a" in whole else a["a"].abs() @ b["a"].abs()

            kron = torch.kron(
                magnitude(m.lokr_w1, m.lokr_w1_a, m.lokr_w1_b), magnitude(m.lokr_w2, m.lokr_w2_a, m.lokr_w2_b)
            )
            key = name.removeprefix("base_model.model.") + ".weight"
            bound[key] = 4 * m.r["a"] * 2**-24 * abs(m.scaling["a"]) * kron.detach().double()
    return bound


def compare_within(ours: dict[str, torch.Tensor], oracle: torch.nn.Module, bound: dict[str, torch.Tensor]) -> float:
    """Asserts fp32 tensors in `bound` are within it plus 1 ulp of the oracle, all others equal;
    returns the fraction of elements not bit-equal."""
    state = oracle.state_dict()
    differing = total = 0
    for k, v in ours.items():
        ref = state[k]
        if k in bound:
            mag = torch.maximum(v.double().abs(), ref.double().abs())
            allowed = bound[k] + ulp_of(mag, torch.float32)
            assert bool(((v.double() - ref.double()).abs() <= allowed).all()), k
        else:
            assert torch.equal(v, ref), k
        differing += int((v != ref).sum())
        total += v.numel()
    return differing / total


def merge_and_check(
    base: Path, adapters: list[Path], tmp: Path, dtype: torch.dtype, weights=None, fp32_bound=None
) -> float:
    """Merges, compares with the oracle and its logits, unmerges with the sidecar and checks every
    tensor comes back bit for bit. Returns the fraction of elements that differ from PEFT.

    fp32: bit-identical (both compute the same fp32 operations in the same order), except within
    `fp32_bound` where one is given (see lokr_rounding_bound).
    bf16: oxpeft rounds once where PEFT may round the delta first; at most 1 ulp apart at the
    scale of the larger of the base element and the result (a sum that cancels to nearly zero
    is judged at the scale it was computed at).
    """
    out, back = tmp / "merged", tmp / "back"
    report = oxpeft.merge_checkpoint(base, adapters, out, weights=weights, progress=False)
    assert report.exact and report.tensors_changed > 0
    oracle = peft_merged(base, adapters, dtype, weights=weights)
    ours = read_checkpoint(out)
    if dtype != torch.float32:
        frac = compare(ours, oracle, max_ulp=1, scale=read_checkpoint(base))
        torch.testing.assert_close(logits(out, dtype), logits(oracle), rtol=0.05, atol=0.05)
    elif fp32_bound is not None:
        frac = compare_within(ours, oracle, fp32_bound)
        torch.testing.assert_close(logits(out), logits(oracle), rtol=1e-5, atol=1e-5)
    else:
        frac = compare(ours, oracle, max_ulp=0)
        assert frac == 0.0 and torch.equal(logits(out), logits(oracle))
    unmerged = oxpeft.unmerge_checkpoint(out, adapters, back, progress=False)
    assert unmerged.exact and sha_per_tensor(back) == sha_per_tensor(base)
    print(f"{[a.name for a in adapters]} {dtype}: {100 * frac:.4f} % of elements differ from PEFT (within the bounds); "
          f"sidecar {100 * report.sidecar_fraction:.3f} % of the model")
    return frac


@pytest.mark.parametrize("key, dtype", [("llama32", torch.float32), ("llama16b", torch.bfloat16)])
def test_ia3_rows_bias_and_feedforward_columns(models, tmp_path, key, dtype):
    base = models[key]
    config = IA3Config(target_modules=ALL_LINEAR, feedforward_modules=["up_proj", "down_proj"])
    adapter = make_adapter(base, tmp_path / "ia3", config)
    merge_and_check(base, [adapter], tmp_path, dtype)
    # The attention output biases were scaled; the feedforward layers' biases were not.
    ours, orig = read_checkpoint(tmp_path / "merged"), read_checkpoint(base)
    assert not torch.equal(ours["model.layers.0.self_attn.o_proj.bias"], orig["model.layers.0.self_attn.o_proj.bias"])
    assert torch.equal(ours["model.layers.0.mlp.down_proj.bias"], orig["model.layers.0.mlp.down_proj.bias"])


def test_ia3_gpt2_conv1d_weighted_and_zero_factor(models, tmp_path):
    base = models["gpt2"]
    config = IA3Config(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
    adapter = make_adapter(base, tmp_path / "ia3", config)
    assert peft.PeftConfig.from_pretrained(adapter).fan_in_fan_out  # PEFT sets it for Conv1D
    merge_and_check(base, [adapter], tmp_path, torch.float32, weights=[0.5])

    # A zero factor is undone only with the sidecar; without it the unmerge is refused.
    from safetensors.torch import load_file

    zeroed = tmp_path / "zeroed"
    zeroed.mkdir()
    (zeroed / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    state = load_file(adapter / "adapter_model.safetensors")
    state["base_model.model.transformer.h.0.attn.c_attn.ia3_l"][5] = 0.0
    save_file(state, zeroed / "adapter_model.safetensors")
    plain = tmp_path / "plain"
    oxpeft.merge_checkpoint(base, zeroed, plain, exact_unmerge=False, progress=False)
    refused = pytest.raises(ValueError, match=r"c_attn\.(weight|bias).*zero")
    with pytest.warns(UserWarning, match="approximate"), refused:
        oxpeft.unmerge_checkpoint(plain, zeroed, tmp_path / "nothing", progress=False, approximate=True)
    assert not (tmp_path / "nothing").exists()
    exact = tmp_path / "exact"
    oxpeft.merge_checkpoint(base, zeroed, exact, progress=False)
    oxpeft.unmerge_checkpoint(exact, zeroed, tmp_path / "back-zero", progress=False)
    assert sha_per_tensor(tmp_path / "back-zero") == sha_per_tensor(base)


@pytest.mark.parametrize("key, dtype", [("llama32", torch.float32), ("llama16b", torch.bfloat16)])
def test_loha_with_rank_and_alpha_patterns(models, tmp_path, key, dtype):
    base = models[key]
    config = LoHaConfig(
        r=8, alpha=16, target_modules=ALL_LINEAR, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    adapter = make_adapter(base, tmp_path / "loha", config)
    merge_and_check(base, [adapter], tmp_path, dtype)


def lokr_adapters(base: Path, tmp: Path) -> tuple[Path, Path]:
    """hidden 64 = 8 x 8: r=2 < 8 / 2 stores both factors as low-rank pairs (decompose_both), r=8
    in the MLP keeps both whole; decompose_factor=4 makes w2 (16 x 16 / 16 x 32) a low-rank pair."""
    both = make_adapter(
        base, tmp / "lokr-both", LoKrConfig(
            r=2, alpha=3, target_modules=ALL_LINEAR, decompose_both=True, rank_pattern={r"mlp\..*": 8},
            alpha_pattern={"o_proj": 5},
        ),
    )
    keys = read_checkpoint(both)
    assert any(k.endswith("q_proj.lokr_w1_a") for k in keys) and any(k.endswith("up_proj.lokr_w1") for k in keys)
    factor = make_adapter(
        base, tmp / "lokr-f4", LoKrConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"], decompose_factor=4),
        seed=2,
    )
    assert any(k.endswith("lokr_w2_a") for k in read_checkpoint(factor))
    return both, factor


@pytest.mark.parametrize("key, dtype", [("llama32", torch.float32), ("llama16b", torch.bfloat16)])
def test_lokr_full_and_low_rank_factors(models, tmp_path, key, dtype):
    base = models[key]
    both, factor = lokr_adapters(base, tmp_path)
    bound = lokr_rounding_bound(base, both) if dtype == torch.float32 else None
    merge_and_check(base, [both], tmp_path / "both", dtype, fp32_bound=bound)
    merge_and_check(base, [factor], tmp_path / "factor", dtype)


def test_mixed_methods_merge_in_order_with_weights(models, tmp_path):
    base = models["llama32"]
    _, factor = lokr_adapters(base, tmp_path)
    ia3 = make_adapter(
        base, tmp_path / "ia3", IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        seed=3,
    )
    loha = make_adapter(base, tmp_path / "loha", LoHaConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"]), seed=4)
    merge_and_check(base, [factor, ia3, loha], tmp_path / "mixed", torch.float32, weights=[0.5, 1.0, -2.0])


def test_other_methods_are_refused_before_writing(tmp_path):
    """Methods the offline merge does not know are refused by name (convolutions: test_checkpoint_merge_conv.py)."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, base / "model.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    pm = get_peft_model(Net(), AdaLoraConfig(target_modules=["lin"], total_step=10))
    pm.save_pretrained(tmp_path / "adalora")
    with pytest.raises(ValueError, match="peft_type 'ADALORA'"):
        oxpeft.merge_checkpoint(base, tmp_path / "adalora", work / "out", progress=False)
    assert list(work.iterdir()) == []
