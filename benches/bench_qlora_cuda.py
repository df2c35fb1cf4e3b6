"""QLoRA training step on a GPU: oxpeft's NF4 Linear4bit against HF PEFT on bitsandbytes' Linear4bit.

Both quantise the same bf16 Llama checkpoint to NF4 with double quantisation and bf16 compute, wrap it in
LoRA r=16 on all linear layers, and time forward + backward + AdamW steps; each setup runs in its own process
so that its peak GPU memory (torch.cuda.max_memory_allocated) is its own. Without bitsandbytes only oxpeft
runs. `--device cpu` runs the same script on the CPU (a smoke test of the script itself).

    PYTHONPATH=python python benches/bench_qlora_cuda.py [--hidden 2048 --layers 8 --batch 4 --seq 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch

setup, model_dir, device, batch, seq, steps = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
cuda = device == "cuda"
if setup == "oxpeft":
    import oxpeft
    model = oxpeft.load_quantized(model_dir, oxpeft.QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model = model.to(device)
    model = oxpeft.get_peft_model(model, oxpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
else:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map=device, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

def sync():
    if cuda:
        torch.cuda.synchronize()

def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

for _ in range(2):
    step()
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
print(json.dumps({"setup": setup, "median_s": sorted(times)[len(times) // 2], "best_s": min(times),
                  "peak_mib": peak, "loss": float(loss)}))
"""


def _make_checkpoint(path: str, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    try:
        import bitsandbytes  # noqa: F401

        setups = ["oxpeft", "peft+bitsandbytes"]
    except ImportError:
        setups = ["oxpeft"]
        print("bitsandbytes does not import here: oxpeft only")
    with tempfile.TemporaryDirectory() as tmp:
        _make_checkpoint(tmp, args.hidden, args.layers)
        print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}, NF4 + double quant, "
              f"bf16 compute, LoRA r=16 all-linear, device {args.device}")
        results = {}
        for setup in setups:
            cmd = [sys.executable, "-c", CHILD, setup, tmp, args.device,
                   *map(str, (args.batch, args.seq, args.steps))]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if out.returncode != 0:
                print(f"{setup} failed:\n{out.stderr[-3000:]}")
                continue
            results[setup] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[setup]
            print(f"{setup:>18}: step {r['median_s'] * 1e3:8.1f} ms (best {r['best_s'] * 1e3:.1f})  "
                  f"peak GPU memory {r['peak_mib']:8.0f} MiB  loss {r['loss']:.3f}")
        if len(results) == 2:
            ox, pf = results["oxpeft"], results["peft+bitsandbytes"]
            print(f"oxpeft / PEFT+bitsandbytes: step time {ox['median_s'] / pf['median_s']:.2f}x, "
                  f"peak memory {ox['peak_mib'] / pf['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
