"""Offline merge of a DoRA adapter that also adapts the embedding: oxpeft vs HF PEFT, side by side.

DoRA on an embedding (and on transformers' Conv1D) scales the table's columns by norms taken over every row of the
base tensor, so oxpeft's streaming merge makes one extra pass over that tensor before it merges it; row DoRA (the
Linear layers) needs none. This bench measures what that costs against PEFT's load + merge_and_unload + save, on the
~1 GiB bf16 Llama-shaped checkpoint of bench_merge.py, with an r=16 DoRA adapter on the embedding and every Linear
layer. Each contender runs in its own process, best of `--repeat`, round-robin; the unmerge is checked
byte-identical to the base.

    PYTHONPATH=python python benches/bench_merge_dora.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import DATA, LAYERS, SHAPE, TARGETS, generate, run, warm  # noqa: E402


def dora_adapter(base: Path) -> Path:
    """An r=16 DoRA adapter on the embedding and every Linear layer, with trained-looking magnitudes, made once."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = DATA / (base.name + "-dora-r16")
    if (out / "adapter_model.safetensors").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=TARGETS + ["embed_tokens"], task_type="CAUSAL_LM").save_pretrained(out)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shard in index.items():
        module = name[: -len(".weight")]
        if not any(module.endswith(t) for t in TARGETS + ["embed_tokens"]):
            continue
        with safe_open(str(base / shard), "pt") as f:
            w = f.get_tensor(name).float()
        key = f"base_model.model.{module}"
        rows, cols = w.shape
        if module.endswith("embed_tokens"):  # A (r, vocab), B (dim, r); magnitude per column
            a = torch.randn(16, rows, generator=gen) * 0.02
            b = torch.randn(cols, 16, generator=gen) * 1e-3
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a, b
            norm = (w + 2.0 * (b @ a).T).norm(dim=0)
        else:
            a = torch.randn(16, cols, generator=gen) / cols**0.5
            b = torch.randn(rows, 16, generator=gen) * 1e-3
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            norm = (w + 2.0 * b @ a).norm(dim=1)
        tensors[f"{key}.lora_magnitude_vector"] = norm * (1 + 0.05 * torch.rand(norm.shape, generator=gen))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()
    base, _ = generate(1)
    adapter = dora_adapter(base)
    warm(base)
    work = DATA / "dora-out"
    best: dict[str, dict] = {}
    for _ in range(opts.repeat):
        for kind in ("oxpeft", "peft"):
            r = run(kind, base, adapter, work / kind)
            if kind not in best or r["seconds"] < best[kind]["seconds"]:
                best[kind] = r
    r = run("oxpeft-unmerge", work / "oxpeft", adapter, work / "back")
    same = all((work / "back" / f.name).read_bytes() == f.read_bytes() for f in base.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
    print(f"checkpoint {size:.2f} GiB bf16 ({LAYERS[1]} layers, vocab {SHAPE['vocab']}), DoRA r=16 on the embedding and all Linear layers")
    for kind, res in best.items():
        print(f"  {kind:8s} {res['seconds']:7.2f} s  cpu {res['cpu']:6.2f} s  peak RSS {res['peak_rss'] / 2**20:7.0f} MiB")
    print(f"  ratio peft / oxpeft: {best['peft']['seconds'] / best['oxpeft']['seconds']:.1f}x time, "
          f"{best['peft']['peak_rss'] / best['oxpeft']['peak_rss']:.1f}x memory")
    print(f"  unmerge {r['seconds']:.2f} s, byte-identical to the base: {same}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
