"""oxpeft.merge_checkpoint / unmerge_checkpoint against HF PEFT's merge_and_unload on real tiny models.

Adapters are made by the real PEFT (get_peft_model + save_pretrained) with random LoRA weights so
that every delta is non-zero; the oracle is PeftModel.from_pretrained(...).merge_and_unload().
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import oxpeft
from oxpeft import cli
from conftest import TINY_LLAMA
from oxpeft.checkpoint import SIDECAR_DIR

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402

LLAMA = dict(TINY_LLAMA, tie_word_embeddings=False)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOATS = {torch.float32, torch.bfloat16, torch.float16}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama checkpoints (fp32 sharded, bf16 single file, fp16 sharded) and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    out = {}
    for name, dtype, shard in [
        ("llama32", torch.float32, "150KB"),
        ("llama16b", torch.bfloat16, "10GB"),
        ("llama16", torch.float16, "100KB"),
    ]:
        llama.to(dtype).save_pretrained(root / name, max_shard_size=shard)
        out[name] = root / name
    (root / "llama32" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    return out


def make_adapter(model_dir: Path, path: Path, seed: int = 1, safe: bool = True, **lora_kwargs) -> Path:
    """A real PEFT adapter with random (non-zero) LoRA weights, saved with save_pretrained."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            elif "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(path, safe_serialization=safe)
    return path


def peft_merged(model_dir: Path, adapters: list[Path], dtype: torch.dtype, weights=None) -> torch.nn.Module:
    """The oracle: HF PEFT's merge_and_unload of the adapters (in order) into the base."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    names = ["a0"]
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if weights is not None:
        for m in pm.modules():
            if isinstance(m, LoraLayer):
                for n, w in zip(names, weights):
                    if n in m.scaling:
                        m.scaling[n] *= w
    return pm.merge_and_unload(adapter_names=names)


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two same-dtype float tensors."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]

    def ordered(t):
        i = t.view(bits).to(torch.int64)
        sign_bit = 1 << (torch.finfo(t.dtype).bits - 1)
        return torch.where(i < 0, -(i + sign_bit), i)

    return (ordered(a) - ordered(b)).abs()


def ulp_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at magnitude |x| (as fp64)."""
    mantissa = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 1 - mantissa)


def compare(
    ours: dict[str, torch.Tensor], oracle: torch.nn.Module, max_ulp: int, scale: dict[str, torch.Tensor] | None = None
) -> float:
    """Asserts every tensor of the oracle matches within max_ulp; returns the fraction not bit-equal.

    With `scale` (the base weights), the ulp is taken at the larger of the two results and the base
    element, so that a result that cancels to nearly zero is judged at the scale it was computed at.
    """
    state = {k: v for k, v in oracle.state_dict().items() if k in ours}
    assert set(state) == set(ours), set(state) ^ set(ours)
    differing = total = 0
    for k, v in state.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        if v.dtype in FLOATS:
            d = ulp_distance(ours[k], v.contiguous())
            if scale is not None and k in scale:
                mag = torch.maximum(torch.maximum(ours[k].double().abs(), v.double().abs()), scale[k].double().abs())
                ulps = (ours[k].double() - v.double()).abs() / ulp_of(mag, v.dtype)
                assert float(ulps.max()) <= max_ulp, f"{k}: {float(ulps.max())} ulp at the base's scale"
            else:
                assert int(d.max()) <= max_ulp, f"{k}: {int(d.max())} ulp"
            differing += int((d > 0).sum())
        else:
            assert torch.equal(ours[k], v), k
        total += v.numel()
    return differing / total


def sha_per_tensor(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def logits(folder_or_model, dtype=torch.float32) -> torch.Tensor:
    model = folder_or_model
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    ids = torch.arange(12).reshape(1, 12) * 7 % 256
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_plain_lora_fp32_sharded_equals_peft_exactly(models, tmp_path):
    base = models["llama32"]
    adapter = make_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    out = tmp_path / "merged"
    report = oxpeft.merge_checkpoint(base, adapter, out, progress=False)
    assert report.tensors_changed == 7 * 2 and report.exact

    oracle = peft_merged(base, [adapter], torch.float32)
    assert compare(read_checkpoint(out), oracle, max_ulp=0) == 0.0
    assert torch.equal(logits(out), logits(oracle))

    # Same shard layout, index, metadata, tensor order; non-weight files copied; sidecar hidden.
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in shards:
        with safe_open(base / name, "pt") as a, safe_open(out / name, "pt") as b:
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
    for f in ["config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"]:
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    assert (out / SIDECAR_DIR / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("model_key, dtype", [("llama16b", torch.bfloat16), ("llama16", torch.float16)])
def test_rslora_patterns_half_precision_within_one_ulp(models, tmp_path, dtype, model_key):
    base = models[model_key]
    adapter = make_adapter(
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    out = tmp_path / "merged"
    oxpeft.merge_checkpoint(base, [adapter], out, progress=False)
    oracle = peft_merged(base, [adapter], dtype)
    frac = compare(read_checkpoint(out), oracle, max_ulp=1)
    print(f"{dtype}: {100 * frac:.4f} % of elements 1 ulp from PEFT, none further")
    torch.testing.assert_close(logits(out, dtype), logits(oracle), rtol=0.05, atol=0.05)


def test_dora_and_unmerge_exact(models, tmp_path):
    for key, dtype in [("llama32", torch.float32), ("llama16b", torch.bfloat16)]:
        base = models[key]
        adapter = make_adapter(base, tmp_path / f"ad-{key}", r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEAR)
        out = tmp_path / f"merged-{key}"
        oxpeft.merge_checkpoint(base, adapter, out, progress=False)
        # The DoRA row norm is reduced in f64, torch reduces in fp32 in its own order: the row
        # factors differ in their last bit, a few fp32 ulp after the multiply.
        frac = compare(read_checkpoint(out), peft_merged(base, [adapter], dtype), max_ulp=4 if dtype == torch.float32 else 1)
        print(f"DoRA {dtype}: {100 * frac:.4f} % of elements 1 ulp from PEFT")
        back = tmp_path / f"back-{key}"
        oxpeft.unmerge_checkpoint(out, adapter, back, progress=False)
        assert sha_per_tensor(back) == sha_per_tensor(base)


@pytest.mark.parametrize("first_dora", [False, True])
def test_dora_after_another_adapter_takes_the_base_norm(models, tmp_path, first_dora):
    """A DoRA adapter merged after another one into the same weight: its norm is that of the base weight plus its
    own delta (as in the forward pass and PEFT's merge), not of the weight with the first adapter merged."""
    base = models["llama32"]
    a = make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, use_dora=first_dora, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj", "o_proj"])
    out = tmp_path / "merged"
    oxpeft.merge_checkpoint(base, [a, b], out, progress=False)
    # PEFT recovers the base weight by unmerging the first adapter in fp32, so its results are some ulp off (as
    # much as oxpeft's are from an fp64 reference); taking the norm of the weight so far is off by ~1e-2.
    ours, oracle = read_checkpoint(out), peft_merged(base, [a, b], torch.float32).state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(value, oracle[key], rtol=1e-5, atol=1e-6, msg=key)
    back = tmp_path / "back"
    oxpeft.unmerge_checkpoint(out, [a, b], back, progress=False)
    assert sha_per_tensor(back) == sha_per_tensor(base)


def test_fan_in_fan_out_gpt2_with_lora_bias(models, tmp_path):
    base = models["gpt2"]
    adapter = make_adapter(
        base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True
    )
    out = tmp_path / "merged"
    report = oxpeft.merge_checkpoint(base, adapter, out, progress=False)
    # Per block: c_attn, attn.c_proj, mlp.c_proj, each weight and bias.
    assert report.tensors_changed == 2 * 3 * 2
    oracle = peft_merged(base, [adapter], torch.float32)
    assert compare(read_checkpoint(out), oracle, max_ulp=0) == 0.0
    assert torch.equal(logits(out), logits(oracle))


@pytest.mark.parametrize("model_key, dtype", [("gpt2", torch.float32), ("llama16b", torch.bfloat16)])
def test_dora_along_columns_embeddings_and_fan_in_fan_out(models, tmp_path, model_key, dtype):
    """DoRA whose magnitude scales W's columns: GPT-2's Conv1D weights (stored (in, out)) and embedding tables, the
    norms taken over every row of the base tensor. In fp32 two adapters are stacked (in bf16 PEFT recovers the base
    for the second one's norm by unmerging the first in bf16, some ulp off: one adapter is compared there)."""
    base = models[model_key]
    if model_key == "gpt2":
        kwargs = dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True)
    else:
        kwargs = dict(target_modules=["embed_tokens", "q_proj"])
    a = make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, use_dora=True, **kwargs)
    b = make_adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=4, use_dora=True, **kwargs)
    adapters = [a, b] if dtype == torch.float32 else [a]
    out = tmp_path / "merged"
    oxpeft.merge_checkpoint(base, adapters, out, progress=False)
    ours, oracle = read_checkpoint(out), peft_merged(base, adapters, dtype)
    changed = {k for k, v in read_checkpoint(base).items() if not torch.equal(v, ours[k])}
    assert any("wte" in k or "embed_tokens" in k for k in changed)
    if dtype == torch.float32:
        for key, value in oracle.state_dict().items():
            if key in ours:
                torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    else:
        compare(ours, oracle, max_ulp=1, scale=read_checkpoint(base))
    back = tmp_path / "back"
    assert oxpeft.unmerge_checkpoint(out, adapters, back, progress=False).exact
    assert sha_per_tensor(back) == sha_per_tensor(base)


def test_embedding_lora_modules_to_save_and_exact_unmerge(models, tmp_path):
    base = models["llama16b"]
    adapter = make_adapter(
        base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
    )
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "base_model.model.lm_head.weight" in keys and any("lora_embedding_A" in k for k in keys)
    out = tmp_path / "merged"
    oxpeft.merge_checkpoint(base, adapter, out, progress=False)
    ours, orig = read_checkpoint(out), read_checkpoint(base)
    # PEFT rounds the embedding delta to bf16 before adding it (two roundings); oxpeft rounds once,
    # which equals torch's fp32 sum rounded to bf16 exactly.
    state = load_file(adapter / "adapter_model.safetensors")
    emb_a = state["base_model.model.model.embed_tokens.lora_embedding_A"].float()
    emb_b = state["base_model.model.model.embed_tokens.lora_embedding_B"].float()
    exact = (orig["model.embed_tokens.weight"].float() + (emb_b @ emb_a).T * 2.0).to(torch.bfloat16)
    assert torch.equal(ours["model.embed_tokens.weight"], exact)
    oracle = peft_merged(base, [adapter], torch.bfloat16)
    frac = compare(ours, oracle, max_ulp=1, scale=orig)
    print(f"embedding + modules_to_save bf16: {100 * frac:.4f} % of elements differ from PEFT, <= 1 ulp at the base's scale")
    assert not torch.equal(ours["lm_head.weight"], read_checkpoint(base)["lm_head.weight"])

    back = tmp_path / "back"
    report = oxpeft.unmerge_checkpoint(out, adapter, back, progress=False)
    assert report.exact and sha_per_tensor(back) == sha_per_tensor(base)
    with pytest.raises(ValueError, match="modules_to_save"):
        with pytest.warns(UserWarning, match="approximate"):
            no_sidecar = tmp_path / "merged-plain"
            oxpeft.merge_checkpoint(base, adapter, no_sidecar, exact_unmerge=False, progress=False)
            oxpeft.unmerge_checkpoint(no_sidecar, adapter, tmp_path / "back2", progress=False, approximate=True)
    assert not (tmp_path / "back2").exists()


def test_two_adapters_with_weights_and_bin_adapter(models, tmp_path, capsys):
    base = models["llama32"]
    a = make_adapter(base, tmp_path / "a", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, safe=False, r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"])
    assert (b / "adapter_model.bin").is_file() and not (b / "adapter_model.safetensors").exists()
    out = tmp_path / "merged"
    oxpeft.merge_checkpoint(base, [a, b], out, weights=[0.7, -1.5], progress=True)
    assert f"{len(read_checkpoint(base))}/{len(read_checkpoint(base))} tensors" in capsys.readouterr().err
    oracle = peft_merged(base, [a, b], torch.float32, weights=[0.7, -1.5])
    assert compare(read_checkpoint(out), oracle, max_ulp=0) == 0.0

    back = tmp_path / "back"
    with pytest.raises(ValueError, match="other adapters"):
        oxpeft.unmerge_checkpoint(out, [b, a], back, progress=False)
    oxpeft.unmerge_checkpoint(out, [a, b], back, progress=False)
    assert sha_per_tensor(back) == sha_per_tensor(base)


def test_approximate_unmerge_warns_and_is_close(models, tmp_path):
    base = models["llama16b"]
    adapter = make_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    out = tmp_path / "merged"
    report = oxpeft.merge_checkpoint(base, adapter, out, exact_unmerge=False, progress=False)
    assert report.sidecar_bytes == 0 and not (out / SIDECAR_DIR).exists()
    with pytest.raises(ValueError, match=r"no exact-unmerge sidecar.*approximate=True"):
        oxpeft.unmerge_checkpoint(out, adapter, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
    with pytest.warns(UserWarning, match="approximate"):
        r = oxpeft.unmerge_checkpoint(out, adapter, tmp_path / "back", progress=False, approximate=True)
    assert not r.exact and "APPROXIMATE" in r.summary()
    ours, orig, merged = read_checkpoint(tmp_path / "back"), read_checkpoint(base), read_checkpoint(out)
    differing = 0
    for k in orig:
        # Two roundings, each at most half an ulp of the larger of the original and merged values.
        mag = torch.maximum(orig[k].double().abs(), merged[k].double().abs())
        err = (ours[k].double() - orig[k].double()).abs() / ulp_of(mag, torch.bfloat16)
        assert float(err.max()) <= 1.0, k
        differing += int((ours[k] != orig[k]).sum())
    print(f"approximate bf16 unmerge: {100 * differing / sum(t.numel() for t in orig.values()):.2f} % of elements differ")


def test_failures_leave_nothing_behind(models, tmp_path):
    base = models["llama32"]
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    work = tmp_path / "work"
    work.mkdir()

    # Adapter whose lora_A does not fit the base: the error names both tensors.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 65)
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*'model\.layers\.1\.self_attn\.q_proj\.weight'"):
        oxpeft.merge_checkpoint(base, bad, work / "out", progress=False)
    assert list(work.iterdir()) == []

    # Corrupt (truncated) last shard of a copy of the base.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in base.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    last = sorted(broken.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-3])
    with pytest.raises(ValueError, match=last.name + ".*truncated"):
        oxpeft.merge_checkpoint(broken, adapter, work / "out", progress=False)
    assert list(work.iterdir()) == []

    # Existing output is refused and untouched; force replaces it.
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        oxpeft.merge_checkpoint(base, adapter, work / "out", progress=False)
    assert (work / "out" / "keep.txt").read_text() == "mine"
    oxpeft.merge_checkpoint(base, adapter, work / "out", force=True, progress=False)
    assert not (work / "out" / "keep.txt").exists() and sorted(p.name for p in work.iterdir()) == ["out"]

    # Refused peft type and an output inside the input.
    boft = tmp_path / "boft"
    boft.mkdir()
    (boft / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT"}))
    save_file({"x": torch.zeros(1)}, boft / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="BOFT"):
        oxpeft.merge_checkpoint(base, boft, work / "o2", progress=False)
    with pytest.raises(ValueError, match="overlaps"):
        oxpeft.merge_checkpoint(base, adapter, base / "inside", progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_corrupt_sidecar_fixups_are_refused_and_leave_nothing(models, tmp_path):
    base = models["llama32"]
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    merged = tmp_path / "merged"
    report = oxpeft.merge_checkpoint(base, adapter, merged, progress=False)
    assert report.sidecar_elements > 0
    sidecar = sorted((merged / "oxpeft-unmerge").glob("*.safetensors"))
    tampered = None
    for f in sidecar:
        state = load_file(f)
        fixes = [k for k in state if k.endswith(".oxpeft_unmerge_fixes")]
        if fixes:
            # A record cut short: the stream loses its last byte (shapes stay consistent).
            state[fixes[0]] = state[fixes[0]][:-1].clone()
            save_file(state, f, metadata={"format": "oxpeft-exact-unmerge", "format_version": "2"})
            tampered = fixes[0].removesuffix(".oxpeft_unmerge_fixes")
            break
    assert tampered is not None, "the sidecar holds format-2 fix-up lists"
    work = tmp_path / "work"
    work.mkdir()
    # The merge's digest of the sidecar file finds the change before anything is written.
    with pytest.raises(ValueError, match=re.escape(f.name) + ".*changed or damaged"):
        oxpeft.unmerge_checkpoint(merged, adapter, work / "back", progress=False)
    assert list(work.iterdir()) == []
    # A sidecar of the format without digests (only used with approximate=True): the fix-up list's own checks.
    manifest_path = merged / "oxpeft-unmerge" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({"format": "oxpeft-exact-unmerge/1", "adapters": manifest["adapters"]}))
    with pytest.raises(ValueError, match="older oxpeft without digests"):
        oxpeft.unmerge_checkpoint(merged, adapter, work / "back", progress=False)
    with pytest.raises(ValueError, match=re.escape(tampered) + ".*corrupt sidecar fix-up list"):
        oxpeft.unmerge_checkpoint(merged, adapter, work / "back", progress=False, approximate=True)
    assert list(work.iterdir()) == []


def test_cli_merge_and_unmerge(models, tmp_path, capsys):
    base = models["llama16"]
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"])
    out, back = tmp_path / "m", tmp_path / "b"
    assert cli.main(["merge", str(base), str(adapter), "-o", str(out), "-q"]) == 0
    assert "sidecar" in capsys.readouterr().out
    assert cli.main(["merge", str(base), str(adapter), "-o", str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["unmerge", str(out), str(adapter), "-o", str(back), "-q"]) == 0
    assert "bit-exact" in capsys.readouterr().out
    assert sha_per_tensor(back) == sha_per_tensor(base)
    assert not (back / SIDECAR_DIR).exists()
    for shard in base.glob("*.safetensors"):
        assert (back / shard.name).read_bytes() == shard.read_bytes()


def test_tied_embedding_lora_warns(models, tmp_path):
    base = models["gpt2"]
    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="tied"):
        oxpeft.merge_checkpoint(base, adapter, tmp_path / "m", progress=False)


def test_interrupt_from_progress_cancels_and_leaves_nothing(models, tmp_path, monkeypatch):
    base = models["llama32"]
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    seen = []

    def interrupt(self, name: str, nbytes: int) -> None:
        seen.append(name)
        raise KeyboardInterrupt

    monkeypatch.setattr("oxpeft.checkpoint._Progress.callback", interrupt)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        oxpeft.merge_checkpoint(base, adapter, work / "out", progress=True)
    assert seen and list(work.iterdir()) == []
