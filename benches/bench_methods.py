"""IA3, LoHa, LoKr and AdaLoRA side by side with HF PEFT: training step, inference forward and merge time.

Both libraries wrap identical copies of one small Llama with the same config; measurements alternate between
them round by round so that load on the machine hits both alike. Prints the best time of the rounds (the least
disturbed by other processes) and PEFT / oxpeft ratios (> 1: oxpeft is faster). task_type CAUSAL_LM, so that
HF PEFT adds AdaLoRA's orthogonality penalty to the training loss as oxpeft does.

    PYTHONPATH=python python benches/bench_methods.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1024,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "IA3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "LoHa": ("LoHaConfig", dict(r=8, alpha=16, target_modules=LINEAR)),
    "LoKr": ("LoKrConfig", dict(r=8, alpha=16, target_modules=LINEAR)),
    "AdaLoRA": ("AdaLoraConfig", dict(init_r=12, target_r=8, target_modules=LINEAR, total_step=100)),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import oxpeft
    import peft

    torch.manual_seed(1)
    batch = torch.randint(0, 1024, (4, 128))
    base = make_model()
    print(f"torch threads: {torch.get_num_threads()}, batch {tuple(batch.shape)}, rounds {args.rounds}")
    print(f"{'method':8} {'measure':22} {'HF PEFT ms':>11} {'oxpeft ms':>10} {'PEFT/oxpeft':>12}")
    for method, (cls_name, kwargs) in METHODS.items():
        models = {
            lib.__name__: lib.get_peft_model(
                copy.deepcopy(base), getattr(lib, cls_name)(task_type="CAUSAL_LM", **kwargs)
            )
            for lib in (peft, oxpeft)
        }
        samples: dict[tuple[str, str], list[float]] = {}

        def train_step(model) -> None:
            model.train()
            model(input_ids=batch, labels=batch).loss.backward()
            model.zero_grad(set_to_none=True)

        def forward(model) -> None:
            model.eval()
            with torch.no_grad():
                model(input_ids=batch)

        for name, model in models.items():  # warm-up
            train_step(model)
            forward(model)
        for _ in range(args.rounds):
            for name, model in models.items():
                samples.setdefault(("train step (fwd+bwd)", name), []).append(timed(lambda: train_step(model)))
                samples.setdefault(("inference forward", name), []).append(timed(lambda: forward(model)))
                victim = copy.deepcopy(model)
                samples.setdefault(("merge_and_unload", name), []).append(timed(victim.merge_and_unload))

        for measure in ("train step (fwd+bwd)", "inference forward", "merge_and_unload"):
            theirs = min(samples[(measure, "peft")])
            ours = min(samples[(measure, "oxpeft")])
            print(f"{method:8} {measure:22} {theirs:11.1f} {ours:10.1f} {theirs / ours:12.2f}")


if __name__ == "__main__":
    main()
