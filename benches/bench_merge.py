"""Offline LoRA merge: oxpeft vs HF PEFT vs a plain copy of the checkpoint, side by side.

Every contender keeps its best of `--repeat` runs (HF PEFT too at 1 GB; once at larger sizes); the
runs go round-robin over the contenders, so a slow spell of a shared machine hits them all alike.

Generates (once, into the git-ignored bench-data/) Llama-shaped bf16 sharded checkpoints of about
1 GB and 4 GB and an all-linear r=16 adapter for each, then runs every contender in its own
subprocess (so that its peak RSS is its own) on a warm page cache:

- oxpeft:  oxpeft.merge_checkpoint (streams mmapped shards, writes the exact-unmerge sidecar);
           also without the sidecar (exact_unmerge=False) and the Rust core alone
- peft:    AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload
           + save_pretrained (at the sizes given by --peft-sizes, 1 GB by default)
- copy:    shutil.copyfile of every file of the checkpoint (and the same followed by fsync, since
           oxpeft fsyncs each shard before renaming it into place)

and oxpeft's unmerge with the sidecar (checked byte-identical to the base) and its sidecar size.

    PYTHONPATH=python python benches/bench_merge.py [--sizes 1 4] [--repeat 2] [--peft-sizes 1 4] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"

# Llama-shaped: hidden 2048, MLP 5632, GQA 16/4 heads, vocab 32000; ~45 M parameters per layer.
SHAPE = dict(hidden=2048, inter=5632, heads=16, kv_heads=4, vocab=32000)
LAYERS = {1: 9, 4: 42}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def generate(size_gb: int) -> tuple[Path, Path]:
    """The bf16 checkpoint (sharded at 500 MB) and an all-linear r=16 adapter, made once."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter = DATA / f"llama-{size_gb}g", DATA / f"llama-{size_gb}g-lora-r16"
    if (base / "model.safetensors.index.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    h, f, v = SHAPE["hidden"], SHAPE["inter"], SHAPE["vocab"]
    kv = SHAPE["kv_heads"] * h // SHAPE["heads"]
    n_layers = LAYERS[size_gb]
    LlamaConfig(
        hidden_size=h, intermediate_size=f, num_hidden_layers=n_layers, num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], vocab_size=v, tie_word_embeddings=False, dtype="bfloat16",
    ).save_pretrained(base)
    shapes = {"model.embed_tokens.weight": (v, h)}
    linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    for i in range(n_layers):
        for name, shape in linear.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)

    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        current[name] = t.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= 500_000_000:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(base / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    # A trained-looking adapter: A ~ kaiming-like, B small, so ||delta|| << ||W|| as in practice.
    LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(adapter)
    tensors = {}
    for i in range(n_layers):
        for name, (out_f, in_f) in linear.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(16, in_f, generator=gen) / in_f**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, 16, generator=gen) * 1e-3).to(torch.bfloat16)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter


def as_fp16(base: Path) -> Path:
    """An fp16 copy of the bf16 checkpoint `base` (same tensors, converted), made once."""
    import torch
    from safetensors.torch import load_file, save_file

    out = base.with_name(base.name + "-fp16")
    if (out / "model.safetensors.index.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for f in sorted(base.iterdir()):
        if f.suffix == ".safetensors":
            tensors = {k: v.to(torch.float16) for k, v in load_file(str(f)).items()}
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["dtype"] = "float16"
            (out / f.name).write_text(json.dumps(cfg, indent=2))
        elif f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    # The index last: its presence marks the copy complete.
    index = json.loads((base / "model.safetensors.index.json").read_text())
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc (VmHWM is the peak RSS of this exec, not inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def contender(kind: str, base: str, adapter: str, out: str) -> None:
    """Runs one contender in this (fresh) process and prints its time and peak RSS as JSON."""
    extra = {}
    if kind == "oxpeft-core":
        # The Rust core alone, loaded without the oxpeft package (whose __init__ imports torch and
        # transformers): the memory the streaming merge itself needs.
        import importlib.util

        so = next((ROOT / "python" / "oxpeft").glob("_native*.so"))
        spec = importlib.util.spec_from_file_location("oxpeft._native", so)
        native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(native)
    elif kind.startswith("oxpeft"):
        import oxpeft
    elif kind == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    rss_after_imports = _status_kib("VmRSS") * 1024
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if kind == "oxpeft":
        r = oxpeft.merge_checkpoint(base, adapter, out, progress=False)
        extra = {"sidecar_bytes": r.sidecar_bytes, "sidecar_elements": r.sidecar_elements}
    elif kind == "oxpeft-nosidecar":
        oxpeft.merge_checkpoint(base, adapter, out, progress=False, exact_unmerge=False)
    elif kind == "oxpeft-core":
        os.makedirs(out)
        native.merge_checkpoint(base, [(adapter, adapter + "/adapter_model.safetensors", 1.0)], out, True, None)
    elif kind == "oxpeft-unmerge":
        oxpeft.unmerge_checkpoint(base, adapter, out, progress=False)
    elif kind == "peft":
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")  # the checkpoint's own dtype
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    elif kind in ("copy", "copy+fsync"):
        os.makedirs(out)
        for f in sorted(Path(base).iterdir()):
            if f.is_file():
                shutil.copyfile(f, Path(out) / f.name)
                if kind == "copy+fsync":
                    fd = os.open(Path(out) / f.name, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    rss = _status_kib("VmHWM") * 1024
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_rss": rss, "rss_imports": rss_after_imports, **extra}))


def run(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    # Let the previous contender's writeback (PEFT and the plain copy do not fsync) finish before
    # this one starts, so no run pays for another's dirty pages.
    os.sync()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, __file__, "--contender", kind, str(base), str(adapter), str(out)],
        capture_output=True, text=True, env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def warm(base: Path) -> None:
    for f in base.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4], choices=sorted(LAYERS))
    ap.add_argument("--repeat", type=int, default=2, help="runs per contender; the best time is kept")
    ap.add_argument("--peft-sizes", type=int, nargs="*", default=[1], help="sizes at which HF PEFT also runs")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="the checkpoint's dtype (fp16: a converted copy)")
    ap.add_argument("--contender", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        contender(*args.contender)
        return

    results = {}
    for size in args.sizes:
        base, adapter = generate(size)
        if args.dtype == "fp16":
            base = as_fp16(base)
        gib = dir_bytes(base) / 2**30
        out, back = DATA / "out", DATA / "back"
        kinds = ["copy", "copy+fsync", "oxpeft-core", "oxpeft", "oxpeft-nosidecar"]
        kinds += ["peft"] if size in args.peft_sizes else []
        row = {}
        # Round-robin over the contenders, so that a slow spell of this shared machine hits them
        # all alike rather than whichever ran during it; each keeps its best run.
        reps = {kind: args.repeat if kind != "peft" or size == 1 else 1 for kind in kinds}
        for rep in range(max(reps.values())):
            for kind in kinds:
                if rep >= reps[kind]:
                    continue
                warm(base)
                r = run(kind, base, adapter, out)
                if kind not in row or r["seconds"] < row[kind]["seconds"]:
                    row[kind] = r
                if kind == "oxpeft":
                    warm(out)
                    um = run("oxpeft-unmerge", out, adapter, back)
                    shards = sorted(p.name for p in base.glob("*.safetensors"))
                    um["byte_identical"] = all(
                        subprocess.run(["cmp", "-s", base / s, back / s]).returncode == 0 for s in shards
                    ) and row.get("unmerge", {}).get("byte_identical", True)
                    if "unmerge" not in row or um["seconds"] < row["unmerge"]["seconds"]:
                        row["unmerge"] = um
                    row["unmerge"]["byte_identical"] = um["byte_identical"]
                    shutil.rmtree(back, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
        for kind in kinds:
            print(kind, row[kind], flush=True)
        results[size] = {"gib": gib, **row}
        ox = row["oxpeft"]
        print(f"\n== {gib:.2f} GiB {args.dtype} checkpoint, all-linear r=16 adapter (load average now "
              f"{os.getloadavg()[0]:.2f}) ==")
        for kind in [*kinds, "unmerge"]:
            r = row[kind]
            print(f"{kind:>12}: wall {r['seconds']:7.2f} s ({gib / r['seconds']:5.2f} GiB/s)  CPU {r['cpu']:7.2f} s  "
                  f"peak RSS {r['peak_rss'] / 2**20:8.1f} MiB (after imports {r['rss_imports'] / 2**20:6.1f} MiB)")
        for ref in ("copy", "copy+fsync"):
            print(f"oxpeft vs {ref}: {ox['seconds'] / row[ref]['seconds']:.2f}x the wall time, "
                  f"{ox['cpu'] / row[ref]['cpu']:.2f}x the CPU time")
        if "peft" in row:
            pf = row["peft"]
            print(f"oxpeft vs PEFT: {pf['seconds'] / ox['seconds']:.1f}x faster (wall), {pf['cpu'] / ox['cpu']:.1f}x less CPU, "
                  f"peak RSS {ox['peak_rss'] / pf['peak_rss']:.3f} of PEFT's")
        print(f"sidecar: {ox['sidecar_bytes'] / 2**20:.2f} MiB = {100 * ox['sidecar_bytes'] / (gib * 2**30):.3f} % "
              f"of the model ({ox['sidecar_elements']} elements); unmerge byte-identical: {row['unmerge']['byte_identical']}")
    if len(results) > 1:
        small, big = sorted(results)[:2]
        for kind in ("oxpeft", "oxpeft-core"):
            a, b = (results[k][kind]["peak_rss"] / 2**20 for k in (small, big))
            print(f"\n{kind} peak RSS {a:.0f} MiB -> {b:.0f} MiB as the model grows {small} -> {big} GB")
    suffix = "" if args.dtype == "bf16" else f"-{args.dtype}"
    (DATA / f"results-merge{suffix}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
