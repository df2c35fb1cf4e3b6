"""LoRA training step, inference and adapter switching: oxpeft vs HF PEFT, side by side in one process.

    python benches/bench_training.py [--quick]

Both libraries wrap identical copies of the same small Llama with the same config and seed; timings
alternate between them (ABAB...) and the medians are compared, so background load hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import oxpeft


def _llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=8192,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg)


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _alternate(fns: dict, repeat: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name] += _time(fn, 1)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    import peft

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    hidden, layers, repeat = (256, 2, 5) if args.quick else (512, 4, 15)
    torch.set_num_threads(2)
    base = _llama(hidden, layers)
    kwargs = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    ours = oxpeft.get_peft_model(copy.deepcopy(base), oxpeft.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    batch = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(0))

    def train_step(model, opt):
        def step():
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
    ours.train(), theirs.train()
    train = _alternate({"oxpeft": train_step(ours, opt_a), "peft": train_step(theirs, opt_b)}, repeat)

    ours.eval(), theirs.eval()

    def forward(model):
        def run():
            with torch.no_grad():
                model(input_ids=batch)

        return run

    unmerged = _alternate({"oxpeft": forward(ours), "peft": forward(theirs), "base": forward(base)}, repeat)
    ours.merge_adapter(), theirs.merge_adapter()
    merged = _alternate({"oxpeft": forward(ours), "peft": forward(theirs)}, repeat)
    ours.unmerge_adapter(), theirs.unmerge_adapter()

    switch = {}
    for n in (2, 10):
        a = oxpeft.get_peft_model(copy.deepcopy(base), oxpeft.LoraConfig(**kwargs))
        b = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        for i in range(1, n):
            a.add_adapter(f"a{i}", oxpeft.LoraConfig(**kwargs))
            b.add_adapter(f"a{i}", peft.LoraConfig(**kwargs))
        names = ["default"] + [f"a{i}" for i in range(1, n)]
        cycle = {"i": 0}

        def switcher(model):
            def run():
                cycle["i"] += 1
                model.set_adapter(names[cycle["i"] % n])

            return run

        switch[n] = _alternate({"oxpeft": switcher(a), "peft": switcher(b)}, repeat * 4)

    print(f"# machine: 2-core x86-64 CPU, 24 GiB, no GPU; torch {torch.__version__}, peft {peft.__version__}")
    print(f"# model: Llama hidden={hidden} layers={layers} vocab=8192, batch 4x128, LoRA r=16 all-linear")
    print("| measurement | oxpeft (ms) | HF PEFT (ms) | oxpeft / PEFT |")
    print("|---|---|---|---|")
    rows = [
        ("training step (fwd+bwd+AdamW)", train),
        ("inference, unmerged adapter", unmerged),
        ("inference, merged adapter", merged),
        ("set_adapter, 2 adapters loaded", switch[2]),
        ("set_adapter, 10 adapters loaded", switch[10]),
    ]
    for label, res in rows:
        print(f"| {label} | {res['oxpeft'] * 1e3:.2f} | {res['peft'] * 1e3:.2f} | {res['oxpeft'] / res['peft']:.2f} |")
    print(f"| inference, bare base model | {unmerged['base'] * 1e3:.2f} | | |")


if __name__ == "__main__":
    main()
