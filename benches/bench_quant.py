"""NF4 quantise / dequantise throughput and quantised-loading memory: oxpeft vs bitsandbytes on CPU.

Run:  PYTHONPATH=python python benches/bench_quant.py [--skip-load] [--skip-int8]
Both sides run in this one process on the same tensors; the ratio column is oxpeft / bitsandbytes
(for the Linear8bit table, bitsandbytes' time / oxpeft's).
The machine may be shared, so each timing is the best of a few runs, and the load average and the
share of CPU time the process got are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = [torch.bfloat16, torch.float32]


def best(fn, repeats: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (all threads) over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
    return min(walls), min(cpus)


def throughput_table() -> list[dict]:
    import bitsandbytes.functional as F

    from oxpeft.quant import functional as Q

    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            torch.manual_seed(0)
            w = (torch.randn(shape) * 0.02).to(dtype)
            n = w.numel()
            for nested in (False, True):
                ox_q, ox_cpu = best(lambda: Q.quantize_4bit(w, 64, "nf4", compress_statistics=nested), 5)
                bnb_q, bnb_cpu = best(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested), 2)
                rows.append(dict(op="quantise" + (" +dq" if nested else ""), shape=shape, dtype=str(dtype)[6:], oxpeft=n / ox_q / 1e9, bnb=n / bnb_q / 1e9, cpu=(n / ox_cpu / 1e9, n / bnb_cpu / 1e9)))
            packed, state = Q.quantize_4bit(w, 64, "nf4", compress_statistics=False)
            bnb_packed, bnb_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
            # bitsandbytes allocates every output with torch.empty (no out= variant on its CPU backend), so
            # its figure is always a fresh output. oxpeft three ways: a fresh output as users get it (freed
            # outputs go back to oxpeft's buffer pool, so from the second call on the pages are already
            # mapped); "cold", the pool off, so every call maps fresh (huge-page-advised) memory and pays its
            # page faults; and "out=", a caller's reused buffer.
            bnb_d, bnb_cpu = best(lambda: F.dequantize_4bit(bnb_packed, bnb_state), 7)
            ox_out = torch.empty(shape, dtype=dtype)
            limit = Q.set_output_pool_limit(0)
            cold = best(lambda: Q.dequantize_4bit(packed, state), 7)
            Q.set_output_pool_limit(limit)
            for op, fn in (
                ("dequantise", lambda: Q.dequantize_4bit(packed, state)),
                ("deq cold", None),
                ("deq out=", lambda: Q.dequantize_4bit(packed, state, out=ox_out)),
            ):
                ox_d, ox_cpu = best(fn, 7) if fn is not None else cold
                rows.append(dict(op=op, shape=shape, dtype=str(dtype)[6:], oxpeft=n / ox_d / 1e9, bnb=n / bnb_d / 1e9, cpu=(n / ox_cpu / 1e9, n / bnb_cpu / 1e9)))
            del w, packed, bnb_packed, ox_out
    return rows


def int8_table(tokens: int = 128) -> list[dict]:
    """Linear8bit forward (LLM.int8(), threshold 6) against bitsandbytes' Linear8bitLt in inference mode
    (where its CPU backend runs LLM.int8(); in training mode it dequantises), same weights and inputs."""
    import logging

    import bitsandbytes as bnb
    from torch import nn

    from oxpeft.quant import Linear8bit

    logging.disable(logging.WARNING)  # bitsandbytes warns on every call that it rounds inputs to float16
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
        x = torch.randn(tokens, shape[1], dtype=torch.bfloat16)
        x[:, :: shape[1] // 8] *= 8  # a few outlier columns, as LLM activations have
        theirs = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
        theirs.load_state_dict(linear.state_dict())
        theirs = theirs.to("cpu").eval()
        with torch.no_grad():
            expected = theirs(x)
            for threshold in (6.0, 0.0):
                mine = Linear8bit.from_linear(linear, threshold=threshold)
                same = bool(torch.equal(mine(x), expected)) if threshold else None
                # Alternate the two sides round by round so that a burst of load elsewhere hits both.
                ox_t, bnb_t = [], []
                for _ in range(9):
                    ox_t.append(best(lambda: mine(x), 1)[0])
                    bnb_t.append(best(lambda: theirs(x), 1)[0])
                rows.append(dict(shape=shape, threshold=threshold, oxpeft_ms=min(ox_t) * 1e3, bnb_ms=min(bnb_t) * 1e3, identical=same))
    logging.disable(logging.NOTSET)
    return rows


LOAD_CHILD = r"""
import json, sys, time
import torch
side, model_dir = sys.argv[1], sys.argv[2]
import transformers, oxpeft.quant as oq

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

base = hwm_mib()
t0 = time.perf_counter()
if side == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
else:
    model = oq.load_quantized(model_dir, oq.QuantizationConfig())
elapsed = time.perf_counter() - t0
after_load = hwm_mib()
with torch.no_grad():
    model(torch.arange(8).unsqueeze(0))
print(json.dumps({"seconds": elapsed, "base_mib": base, "load_mib": after_load, "forward_mib": hwm_mib()}))
"""

MAKE_CHECKPOINT = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
"""


def load_table(workdir: Path) -> list[dict]:
    model_dir = workdir / "llama-1g"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, str(model_dir)], check=True)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    env = dict(os.environ)
    results = []
    for side in ("transformers", "oxpeft"):
        out = subprocess.run([sys.executable, "-c", LOAD_CHILD, side, str(model_dir)], check=True, capture_output=True, text=True, env=env)
        results.append(dict(side=side, checkpoint_gib=size / 2**30, **json.loads(out.stdout.strip().splitlines()[-1])))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-load", action="store_true", help="skip the ~1 GiB load_quantized memory benchmark")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the quantise / dequantise timings")
    parser.add_argument("--skip-int8", action="store_true", help="skip the Linear8bit LLM.int8() forward timings")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "oxpeft-bench-quant"))
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    # Gp/cpu-s: parameters per CPU-second summed over threads, i.e. per-core throughput, which a
    # busy machine does not deflate the way it deflates the wall-clock figures.
    print(f"{'op':14} {'shape':>12} {'dtype':>9} {'oxpeft Gp/s':>12} {'bnb Gp/s':>9} {'ratio':>7} {'ox Gp/cpu-s':>12} {'bnb Gp/cpu-s':>13}")
    for r in [] if args.skip_throughput else throughput_table():
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['op']:14} {shape:>12} {r['dtype']:>9} {r['oxpeft']:12.3f} {r['bnb']:9.3f} {r['oxpeft'] / r['bnb']:7.1f}"
            f" {r['cpu'][0]:12.2f} {r['cpu'][1]:13.3f}"
        )
    print(f"load average {os.getloadavg()}")
    if not args.skip_int8:
        print(f"\nLinear8bit forward, 128 bf16 tokens, inference: oxpeft vs bitsandbytes Linear8bitLt(threshold=6.0)")
        print(f"{'shape':>12} {'threshold':>9} {'oxpeft ms':>10} {'bnb ms':>8} {'ratio':>6} {'identical':>9}")
        for r in int8_table():
            shape = "x".join(map(str, r["shape"]))
            print(f"{shape:>12} {r['threshold']:9.1f} {r['oxpeft_ms']:10.2f} {r['bnb_ms']:8.2f} {r['bnb_ms'] / r['oxpeft_ms']:6.1f} {str(r['identical']):>9}")
        print(f"load average {os.getloadavg()}")
    if not args.skip_load:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        rows = load_table(Path(args.workdir))
        print(f"\nload of a {rows[0]['checkpoint_gib']:.2f} GiB bf16 Llama checkpoint (separate processes):")
        # Peak RSS (VmHWM) after imports, after loading, and after one 8-token forward pass:
        # transformers maps the checkpoint lazily, so its weights count only once they are touched.
        print(f"{'loader':34} {'seconds':>8} {'imports MiB':>12} {'+load MiB':>10} {'+forward MiB':>13}")
        names = {"transformers": "transformers bf16 from_pretrained", "oxpeft": "oxpeft load_quantized (NF4+dq)"}
        for r in rows:
            print(f"{names[r['side']]:34} {r['seconds']:8.1f} {r['base_mib']:12.0f} {r['load_mib']:10.0f} {r['forward_mib']:13.0f}")
        print(f"peak RSS after a forward pass, oxpeft / transformers: {rows[1]['forward_mib'] / rows[0]['forward_mib']:.2f}")


if __name__ == "__main__":
    main()
