"""One LoRA training step on a small Llama: QLoRA (oxpeft NF4 base) against LoRA on the bf16 model.

Run:  PYTHONPATH=python python benches/bench_qlora_step.py [--hidden 1024 --layers 4 --batch 2 --seq 128]
Each setup runs in its own process (so peak memory is its own): build the model, one warm-up step,
then reset the peak-RSS counter (/proc/self/clear_refs) and time `--steps` steps (forward, backward,
AdamW). "peak RSS" is the process' highest RSS during the timed steps (imports, model, adapter,
optimiser state and the step's transient memory; the imports are the same for every setup), "saved"
the bytes of the distinct tensors autograd keeps from the forward pass for backward (counted with
saved-tensor hooks in one extra forward pass).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import ctypes, json, sys, time, gc
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import oxpeft

setup, hidden, layers, batch, seq, steps = sys.argv[1], *map(int, sys.argv[2:7])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=4096,
                     tie_word_embeddings=False)
model = LlamaForCausalLM(config).to(torch.bfloat16)
if setup.startswith("qlora"):
    model = oxpeft.quantize_model(model, oxpeft.QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
if setup.endswith("+ckpt"):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model = oxpeft.get_peft_model(model, oxpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0))

def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

step()
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so the baseline RSS is what is in use
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
peak = status("VmHWM")
storages = {}

def pack(t):
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t

with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(input_ids=ids, labels=ids)
print(json.dumps({"setup": setup, "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
                  "rss_mib": before, "peak_mib": peak, "saved_mib": sum(storages.values()) / 2**20, "loss": loss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--setups", default="lora-bf16,qlora,qlora+ckpt")
    parser.add_argument("--rounds", type=int, default=2, help="run the setups this many times in turn; best time kept")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()}")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}, LoRA r=16 all-linear, bf16 compute")
    print(f"{'setup':12} {'best s':>7} {'median s':>9} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'saved MiB':>10} {'loss':>7}")
    results: dict[str, dict] = {}
    # Setups alternate round by round, so that a burst of load elsewhere on a shared machine does not
    # land on one setup only; each keeps its best step time (memory figures vary little between runs).
    for _ in range(args.rounds):
        for setup in args.setups.split(","):
            cmd = [sys.executable, "-c", CHILD, setup, *map(str, (args.hidden, args.layers, args.batch, args.seq, args.steps))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if setup not in results or r["best_s"] < results[setup]["best_s"]:
                results[setup] = r
    for r in results.values():
        print(f"{r['setup']:12} {r['best_s']:7.3f} {r['median_s']:9.3f} {r['rss_mib']:15.0f} {r['peak_mib']:13.0f} {r['saved_mib']:10.1f} {r['loss']:7.3f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
