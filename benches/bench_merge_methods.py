"""Offline merge of IA3, LoHa and LoKr adapters: oxpeft vs HF PEFT, beside LoRA r=16.

Uses bench_merge.py's ~1 GiB Llama-shaped bf16 checkpoint and its r=16 LoRA adapter (made once into
bench-data/), adds all-linear IA3, LoHa (r=8) and LoKr (r=8) adapters with trained-looking values
(|delta| about 1 % of |W|, as the LoRA one; IA3 vectors 1 +- 5 %), and runs in fresh processes:

- oxpeft: oxpeft.merge_checkpoint (with the exact-unmerge sidecar), then its unmerge (checked
          byte-identical to the base)
- peft:   AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload
          + save_pretrained

The machine's load average is printed with each figure (other jobs may share the cores).

    PYTHONPATH=python python benches/bench_merge_methods.py [--methods ia3 loha lokr lora] [--no-peft]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import DATA, TARGETS, dir_bytes, generate, run, warm  # noqa: E402


def make_adapter(method: str, base: Path) -> Path:
    """An all-linear adapter of `method` for `base`, its shapes from PEFT on a meta-device model."""
    import torch
    from peft import IA3Config, LoHaConfig, LoKrConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out = DATA / f"{base.name}-{method}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    config = {
        "ia3": IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=8, alpha=16, target_modules=TARGETS),
        "lokr": LoKrConfig(r=8, alpha=16, target_modules=TARGETS),
    }[method]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    pm = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(0)
    # Factor scales for |delta| ~ 2e-4 (bf16 weights ~ 0.02): LoHa products and LoKr factors ~ 0.01.
    std = {"hada_w1_a": 0.06, "hada_w1_b": 0.06, "hada_w2_a": 0.06, "hada_w2_b": 0.06,
           "lokr_w1": 0.01, "lokr_w2": 0.01, "lokr_w1_a": 0.06, "lokr_w1_b": 0.06, "lokr_w2_a": 0.06, "lokr_w2_b": 0.06}
    tensors = {}
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        field = name.split(".")[-2]
        shape = tuple(p.shape)
        if field == "ia3_l":
            t = 1 + 0.05 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * std[field]
        tensors[name.removesuffix(".default")] = t
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["lora", "ia3", "loha", "lokr"])
    ap.add_argument("--no-peft", action="store_true", help="skip HF PEFT (the slow side)")
    args = ap.parse_args()

    base, lora = generate(1)
    gib = dir_bytes(base) / 2**30
    out, back = DATA / "out", DATA / "back"
    results = {}
    for method in args.methods:
        adapter = lora if method == "lora" else make_adapter(method, base)
        row = {}
        for kind in ["oxpeft"] + ([] if args.no_peft else ["peft"]):
            warm(base)
            load = os.getloadavg()[0]
            row[kind] = {**run(kind, base, adapter, out), "load": load}
            if kind == "oxpeft":
                warm(out)
                load = os.getloadavg()[0]
                row["unmerge"] = {**run("oxpeft-unmerge", out, adapter, back), "load": load}
                row["unmerge"]["byte_identical"] = all(
                    subprocess.run(["cmp", "-s", base / s.name, back / s.name]).returncode == 0
                    for s in base.glob("*.safetensors")
                )
                shutil.rmtree(back, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        results[method] = row
        ox = row["oxpeft"]
        print(f"\n== {method}: {gib:.2f} GiB bf16 checkpoint ==")
        for kind, r in row.items():
            print(f"{kind:>8}: wall {r['seconds']:7.2f} s ({gib / r['seconds']:5.2f} GiB/s)  CPU {r['cpu']:7.2f} s  "
                  f"peak RSS {r['peak_rss'] / 2**20:8.1f} MiB  (load average {r['load']:.2f})")
        if "peft" in row:
            print(f"oxpeft vs PEFT: {row['peft']['seconds'] / ox['seconds']:.1f}x faster (wall), "
                  f"peak RSS {ox['peak_rss'] / row['peft']['peak_rss']:.3f} of PEFT's")
        sidecar = ox["sidecar_bytes"]
        print(f"sidecar: {sidecar / 2**20:.2f} MiB = {100 * sidecar / (gib * 2**30):.2f} % of the model "
              f"({ox['sidecar_elements']} elements); unmerge byte-identical: {row['unmerge']['byte_identical']}")
    if "lora" in results:
        ref = results["lora"]["oxpeft"]["seconds"]
        for method, row in results.items():
            print(f"oxpeft {method} merge: {row['oxpeft']['seconds'] / ref:.2f}x the time of LoRA r=16")
    (DATA / "results-merge-methods.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
