"""`oxpeft unmerge` proves the restored checkpoint equal to the original base, or refuses and leaves nothing.

Every case tampers with a real merge (bf16, sharded, so the sidecar has several files) and runs the installed
`oxpeft` command in a subprocess, as a user would: each must be one clear error naming the file or tensor, with no
output folder and no leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import oxpeft
from conftest import make_llama
from test_cli import assert_clean_error, run

SIDECAR = "oxpeft-unmerge"


@pytest.fixture(scope="module")
def merges(tmp_path_factory) -> dict[str, Path]:
    """A sharded bf16 base, LoRA (with an lm_head replaced by modules_to_save), DoRA and IA3 (with zero entries)
    adapters, each merged with the sidecar, and a second LoRA merge at another weight."""
    root = tmp_path_factory.mktemp("proof")
    base = root / "base"
    make_llama(tie_word_embeddings=False).to(torch.bfloat16).save_pretrained(base, max_shard_size="60KB")
    assert len(list(base.glob("*.safetensors"))) > 2
    configs = {
        "lora": oxpeft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False, modules_to_save=["lm_head"]
        ),
        "dora": oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True),
        "ia3": oxpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    out = {"base": base}
    for name, config in configs.items():
        torch.manual_seed(3)
        model = oxpeft.get_peft_model(make_llama(tie_word_embeddings=False), config)
        if name == "ia3":
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "ia3_l" in pname:
                        p.copy_(torch.rand_like(p) * 2)
                        p[..., :3] = 0  # zero entries: only the sidecar can undo them
        model.save_pretrained(root / f"{name}-adapter")
        out[f"{name}-adapter"] = root / f"{name}-adapter"
        merged = root / f"{name}-merged"
        done = run("merge", str(base), str(root / f"{name}-adapter"), "-o", str(merged), "-q")
        assert done.returncode == 0, done.stderr
        out[f"{name}-merged"] = merged
    other = root / "lora-merged-half"
    done = run("merge", str(base), str(out["lora-adapter"]), "-o", str(other), "--weights", "0.5", "-q")
    assert done.returncode == 0, done.stderr
    out["lora-merged-half"] = other
    return out


def _copy(merges: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    merged = tmp_path / "merged"
    shutil.copytree(merges[f"{kind}-merged"], merged)
    return merged


def _sidecar_files(merged: Path) -> list[Path]:
    files = sorted((merged / SIDECAR).glob("*.safetensors"))
    assert len(files) >= 2, files
    return files


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _rewrite(path: Path, change) -> None:
    """Loads a sidecar file, lets `change` edit its tensors, saves it back with its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def _unmerge(merged: Path, adapter: Path, tmp_path: Path):
    out = tmp_path / "back"
    result = run("unmerge", str(merged), str(adapter), "-o", str(out), "-q", timeout=120)
    return result, out


def test_an_untouched_sidecar_restores_the_base_and_says_it_was_checked(merges, tmp_path):
    for kind in ["lora", "dora", "ia3"]:
        result, out = _unmerge(merges[f"{kind}-merged"], merges[f"{kind}-adapter"], tmp_path / kind)
        assert result.returncode == 0, result.stderr
        assert "checked against the original's digest" in result.stdout
        for shard in merges["base"].glob("*.safetensors"):
            assert (out / shard.name).read_bytes() == shard.read_bytes(), (kind, shard.name)
    manifest = json.loads((merges["lora-merged"] / SIDECAR / "manifest.json").read_text())
    assert manifest["format"] == "oxpeft-exact-unmerge/2"
    digests = manifest["digests"]
    assert set(digests["shards"]) == {p.name for p in merges["base"].glob("*.safetensors")}
    assert set(digests["sidecar_files"]) == {p.name for p in (merges["lora-merged"] / SIDECAR).glob("*.safetensors")}
    recorded = {t for s in digests["shards"].values() for t in s["tensors"]}
    assert "lm_head.weight" in recorded and "model.layers.0.self_attn.q_proj.weight" in recorded


def _tamper_cases():
    def delete_a_sidecar_file(m):
        _sidecar_files(m)[0].unlink()
        return "is missing"

    def swap_two_sidecar_files(m):
        a, b = _sidecar_files(m)[:2]
        tmp = a.with_suffix(".tmp")
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
        return "changed or damaged"

    def flip_a_bit_in_a_stored_value(m):
        f = _sidecar_files(m)[0]
        _flip(f, f.stat().st_size - 5)
        return "changed or damaged"

    def flip_a_bit_in_a_fixup_gap(m):
        """The first byte of a fix-up list is the varint gap to its first element: one bit moves every entry."""

        def change(t):
            name = next(k for k in t if k.endswith(".oxpeft_unmerge_fixes"))
            t[name][0] ^= 1

        f = next(p for p in _sidecar_files(m) if any(k.endswith("_fixes") for k in load_file(p)))
        _rewrite(f, change)
        return "changed or damaged"

    def swap_two_tensors_entries(m):
        def change(t):
            names = sorted(k for k in t if k.endswith(".oxpeft_unmerge_fixes"))
            assert len(names) >= 2, list(t)
            a, b = names[:2]
            t[a], t[b] = t[b], t[a]

        f = next(p for p in _sidecar_files(m) if sum(k.endswith("_fixes") for k in load_file(p)) >= 2)
        _rewrite(f, change)
        return "changed or damaged"

    def remove_one_tensors_entries(m):
        def change(t):
            name = next(k for k in t if k.endswith(".oxpeft_unmerge_fixes"))
            del t[name]
            del t[name.replace("_fixes", "_seek")]

        f = next(p for p in _sidecar_files(m) if any(k.endswith("_fixes") for k in load_file(p)))
        _rewrite(f, change)
        return "changed or damaged"

    def add_a_fake_entry(m):
        _rewrite(_sidecar_files(m)[0], lambda t: t.__setitem__("model.norm.weight.oxpeft_original", torch.ones(64)))
        return "changed or damaged"

    def add_a_sidecar_file(m):
        save_file({"x": torch.zeros(2)}, m / SIDECAR / "extra.safetensors")
        return "not a file the merge wrote"

    def edit_the_weight_in_the_manifest(m):
        path = m / SIDECAR / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["adapters"][0]["weight"] = 2.0
        path.write_text(json.dumps(manifest))
        return "edited after the merge"

    def edit_the_weight_and_forge_the_check(m):
        path = m / SIDECAR / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["adapters"][0]["weight"] = 2.0
        body = {k: v for k, v in manifest.items() if k != "check"}
        manifest["check"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        path.write_text(json.dumps(manifest))
        return "differ from the original base"

    def flip_a_bit_in_a_merged_weight(m):
        shard = max(m.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        _flip(shard, shard.stat().st_size - 7)
        return "changed after the merge"

    def remove_the_manifest(m):
        (m / SIDECAR / "manifest.json").unlink()
        return "manifest.json: missing"

    def sidecar_file_is_a_symlink_to_dev_zero(m):
        f = _sidecar_files(m)[0]
        f.unlink()
        os.symlink("/dev/zero", f)
        return "not a regular file"

    def sidecar_file_is_a_fifo(m):
        f = _sidecar_files(m)[0]
        f.unlink()
        os.mkfifo(f)
        return "not a regular file"

    return [
        delete_a_sidecar_file,
        swap_two_sidecar_files,
        flip_a_bit_in_a_stored_value,
        flip_a_bit_in_a_fixup_gap,
        swap_two_tensors_entries,
        remove_one_tensors_entries,
        add_a_fake_entry,
        add_a_sidecar_file,
        edit_the_weight_in_the_manifest,
        edit_the_weight_and_forge_the_check,
        flip_a_bit_in_a_merged_weight,
        remove_the_manifest,
        sidecar_file_is_a_symlink_to_dev_zero,
        sidecar_file_is_a_fifo,
    ]


@pytest.mark.parametrize("tamper", _tamper_cases(), ids=lambda f: f.__name__)
def test_a_tampered_lora_merge_is_refused_and_nothing_is_written(tamper, merges, tmp_path):
    merged = _copy(merges, "lora", tmp_path)
    needle = tamper(merged)
    result, out = _unmerge(merged, merges["lora-adapter"], tmp_path)
    assert_clean_error(result, needle)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back.")]


def test_the_sidecar_of_another_merge_is_refused(merges, tmp_path):
    """The same base and adapter merged at weight 0.5: its sidecar copied into the weight-1 merge."""
    merged = _copy(merges, "lora", tmp_path)
    shutil.rmtree(merged / SIDECAR)
    shutil.copytree(merges["lora-merged-half"] / SIDECAR, merged / SIDECAR)
    result, out = _unmerge(merged, merges["lora-adapter"], tmp_path)
    assert_clean_error(result, "changed after the merge")
    assert not out.exists()


@pytest.mark.parametrize("kind, suffix", [("dora", ".oxpeft_dora_factor"), ("lora", "lm_head.weight.oxpeft_original")])
def test_a_flipped_bit_in_a_dora_factor_or_a_saved_original_is_refused(kind, suffix, merges, tmp_path):
    merged = _copy(merges, kind, tmp_path)

    def change(t):
        name = next(k for k in t if k.endswith(suffix))
        flat = t[name].view(-1)
        flat[0] = flat[0] * 1.5 + 1
        return name

    f = next(p for p in _sidecar_files(merged) if any(k.endswith(suffix) for k in load_file(p)))
    _rewrite(f, change)
    result, out = _unmerge(merged, merges[f"{kind}-adapter"], tmp_path)
    assert_clean_error(result, f.name, "changed or damaged")
    assert not out.exists()


def test_removed_fixups_of_an_ia3_vector_with_zeros_are_refused(merges, tmp_path):
    merged = _copy(merges, "ia3", tmp_path)
    files = [p for p in sorted((merged / SIDECAR).glob("*.safetensors")) if load_file(p)]
    assert files

    def change(t):
        for name in [k for k in t if "down_proj" in k]:
            del t[name]

    f = next(p for p in files if any("down_proj" in k for k in load_file(p)))
    _rewrite(f, change)
    result, out = _unmerge(merged, merges["ia3-adapter"], tmp_path)
    assert_clean_error(result, f.name, "changed or damaged")
    assert not out.exists()


def test_a_merge_that_overflows_is_refused_unless_allowed(merges, tmp_path):
    adapter = tmp_path / "huge"
    shutil.copytree(merges["lora-adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e308
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = run("merge", str(merges["base"]), str(adapter), "-o", str(out), "-q")
    assert_clean_error(result, "non-finite", "--allow-nonfinite", "_proj.weight", "where the base holds")
    assert "allow_nonfinite=True" not in result.stderr
    assert not out.exists()
    result = run("merge", str(merges["base"]), str(adapter), "-o", str(out), "-q", "--allow-nonfinite")
    assert result.returncode == 0, result.stderr
    assert out.is_dir()
