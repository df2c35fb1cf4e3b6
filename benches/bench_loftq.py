"""LoftQ initialisation: oxpeft's Rust loop (randomised truncated SVD) against the same loop in
torch with a full torch.linalg.svd (HF PEFT's LoftQ step), side by side in one run.

Weights are synthetic: Gaussian (std 0.02) plus a rank-32 part, in the shapes of a 7B LLaMA
(4096 x 4096 attention projections, 11008 x 4096 MLP projections). For every shape, rank r and
iteration count T it reports the relative error ||W - deq(Q) - scaling * B @ A|| / ||W|| of

  * plain NF4 (no adapter),
  * oxpeft fast (randomised SVD), the default,
  * the exact-SVD loop (torch.linalg.svd, PEFT's step; T = 1 needs one SVD for both ranks),

and times per matrix for oxpeft fast and the torch loop. A full SVD of 4096^2 takes 25 s to minutes
on a shared 2-core machine, so by default the torch loop runs once per shape, with T = 1 (one SVD
gives the exact errors of both ranks); its T = 5 time is then 5 x its T = 1 time (each iteration is
one NF4 round trip and one SVD). ``--exact-t5`` also runs the exact T = 5 chains (five SVDs per rank).

    PYTHONPATH=python python benches/bench_loftq.py [--exact-t5] [--shapes 4096x4096,11008x4096]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from oxpeft import _native

BLOCKSIZE = 64
SCALING = 1.0  # PEFT applies no scaling; with 1.0 both loops fit B @ A to the same residual


def synthetic_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 32, generator=g) @ torch.randn(32, cols, generator=g)
    return 0.02 * torch.randn(rows, cols, generator=g) + 0.002 * low


def nf4_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """NF4 quantise + dequantise of the whole tensor as flat blocks (bitsandbytes' format)."""
    flat = x.contiguous().numpy().ravel()
    packed, absmax = _native.quantize_4bit(flat, BLOCKSIZE, "nf4", "float32")
    out = _native.dequantize_4bit(packed, absmax, flat.size, BLOCKSIZE, "nf4", "float32")
    return torch.from_numpy(out).reshape(x.shape)


def rel(num: torch.Tensor, weight: torch.Tensor) -> float:
    return (torch.linalg.norm(num) / torch.linalg.norm(weight)).item()


def torch_loftq(weight: torch.Tensor, ranks: list[int], iters: int) -> tuple[dict[int, float], float]:
    """The LoftQ loop with a full torch.linalg.svd per iteration (PEFT's step). With T = 1 the
    SVD does not depend on r, so one SVD serves every rank. Returns errors by rank and seconds."""
    start = time.perf_counter()
    errors = {}
    if iters == 1:
        residual = weight - nf4_roundtrip(weight)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        for r in ranks:
            errors[r] = rel(residual - (u[:, :r] * s[:r]) @ vh[:r], weight)
    else:
        (r,) = ranks
        res = weight
        for i in range(iters):
            residual = weight - nf4_roundtrip(res)
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            low_rank = (u[:, :r] * s[:r]) @ vh[:r]
            res = weight - low_rank
        errors[r] = rel(residual - low_rank, weight)
    return errors, time.perf_counter() - start


def oxpeft_loftq(weight: np.ndarray, rank: int, iters: int, repeats: int = 2) -> tuple[float, float]:
    """Relative error and the best of ``repeats`` timings (the machine is shared)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        *_, err = _native.loftq_init(weight, rank, iters, SCALING, bits=4, quant_type="nf4")
        best = min(best, time.perf_counter() - start)
    return err, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096")
    parser.add_argument("--exact-t5", action="store_true", help="also run the exact T=5 chains (slow)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ranks, iter_counts = [16, 64], [1, 5]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")

    torch.linalg.svd(torch.randn(256, 256))  # load LAPACK before anything is timed
    per_matrix: dict[tuple[int, int, int, int], dict[str, float]] = {}  # (rows, cols, r, T)
    for rows, cols in shapes:
        w = synthetic_weight(rows, cols)
        w_np = w.numpy()
        plain = rel(w - nf4_roundtrip(w), w)
        print(f"\n== {rows}x{cols}: plain NF4 rel. error {plain:.5f}")
        print(
            f"{'r':>3} {'T':>2} | {'fast':>8} {'exact':>8} {'gap':>7} {'captured':>8} | "
            f"{'oxpeft s':>9} {'torch s':>8} {'speed-up':>8}"
        )

        exact_t1, torch_t1_s = torch_loftq(w, ranks, 1)
        svd_s = torch_t1_s  # one NF4 round trip + one full SVD: the torch loop's cost per iteration
        for iters in iter_counts:
            for r in ranks:
                fast, fast_s = oxpeft_loftq(w_np, r, iters)
                if iters == 1:
                    exact, torch_s, measured = exact_t1[r], torch_t1_s, True
                elif args.exact_t5:
                    errs, torch_s = torch_loftq(w, [r], iters)
                    exact, measured = errs[r], True
                else:
                    exact, torch_s, measured = float("nan"), iters * svd_s, False
                if measured:
                    gap, captured = (fast - exact) / exact, (plain - fast) / (plain - exact)
                    quality, note = f"{exact:8.5f} {gap:+7.2%} {captured:8.0%}", ""
                else:
                    quality, note = f"{'-':>8} {'-':>7} {'-':>8}", "  (torch time = T x its T=1 time; exact not run)"
                print(
                    f"{r:>3} {iters:>2} | {fast:8.5f} {quality} | "
                    f"{fast_s:9.2f} {torch_s:8.1f} {torch_s / fast_s:7.0f}x{note}"
                )
                per_matrix[rows, cols, r, iters] = {"fast": fast_s, "torch": torch_s}

    # 7B LLaMA: per layer q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down (4096 x 11008, the
    # transpose: same cost), 32 layers.
    if (4096, 4096) in shapes and (11008, 4096) in shapes:
        print("\n== 7B-shaped model (32 layers x [4 x 4096^2 + 3 x 11008x4096])")
        for r in ranks:
            for iters in iter_counts:
                square, mlp = per_matrix[4096, 4096, r, iters], per_matrix[11008, 4096, r, iters]
                t = {k: 32 * (4 * square[k] + 3 * mlp[k]) for k in ("fast", "torch")}
                print(
                    f"r={r:>2} T={iters}: oxpeft {t['fast'] / 60:6.1f} min, torch full SVD {t['torch'] / 3600:5.1f} h "
                    f"({t['torch'] / t['fast']:.0f}x)"
                )


if __name__ == "__main__":
    main()
