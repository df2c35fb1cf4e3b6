"""TRL SFTTrainer with oxpeft (through `oxpeft alias install --target`) against the real HF PEFT, same script.

LoRA on a full-precision base, and QLoRA: oxpeft's own NF4 quantisation against bitsandbytes' (through
transformers' BitsAndBytesConfig), both with bf16 compute and double quantisation. Each run is a fresh process;
reported: median step time after warm-up and the process's peak resident memory (ru_maxrss), and the ratios.

    python benches/bench_sft.py [--steps 12] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def worker(method: str, steps: int, hidden: int, layers: int, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

    import peft
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    vocab = {f"w{i}": i for i in range(4000)}
    vocab.update({"<unk>": 4000, "<pad>": 4001, "<eos>": 4002})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, pad_token_id=4001, eos_token_id=4002,
    )  # fmt: skip
    base_dir = os.path.join(out, "base")
    LlamaForCausalLM(config).save_pretrained(base_dir)
    oxpeft_is_peft = bool(getattr(peft, "__oxpeft__", False))
    if method == "qlora" and oxpeft_is_peft:
        import oxpeft

        model = LlamaForCausalLM.from_pretrained(base_dir)
        model = oxpeft.quantize_model(model, oxpeft.QuantizationConfig(load_in_4bit=True))
    elif method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
        model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quant)
    else:
        model = LlamaForCausalLM.from_pretrained(base_dir)
    if method == "qlora":
        model = peft.prepare_model_for_kbit_training(model)
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 4000, (120,), generator=g)) for _ in range(4 * steps)]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = SFTConfig(
        os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=steps, save_strategy="no", report_to=[],
        use_cpu=True, max_length=128, logging_steps=steps, seed=0, bf16=False,
    )  # fmt: skip
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer,
        peft_config=lora, callbacks=[Timer()],
    )  # fmt: skip
    trainer.train()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"step_s": statistics.median(times[2:]), "peak_mib": peak_mib, "oxpeft": oxpeft_is_peft}, f)


def run(method: str, alias: str | None, opts) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if alias:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [alias, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(opts.steps), "--hidden", str(opts.hidden),
               "--layers", str(opts.layers), "--out", out]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{method} ({'oxpeft' if alias else 'peft'}) failed:\n{proc.stderr[-4000:]}")
        with open(os.path.join(out, "result.json")) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worker")
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.steps, opts.hidden, opts.layers, opts.out)
        return
    with tempfile.TemporaryDirectory() as site:
        alias = os.path.join(site, "alias")
        subprocess.run([sys.executable, "-m", "oxpeft.cli", "alias", "install", "--target", alias], check=True,
                       capture_output=True)  # fmt: skip
        print(f"Llama hidden {opts.hidden}, {opts.layers} layers, vocab 4096, batch 4 x 128 tokens, LoRA r=16 all-linear,"
              f" {opts.steps} steps, {os.cpu_count()} CPU threads")  # fmt: skip
        print(f"{'run':<8}{'peft s/step':>13}{'oxpeft s/step':>15}{'time ratio':>12}{'peft MiB':>10}{'oxpeft MiB':>12}{'mem ratio':>11}")
        for method in ("lora", "qlora"):
            theirs, ours = run(method, None, opts), run(method, alias, opts)
            assert ours["oxpeft"] and not theirs["oxpeft"]
            print(
                f"{method:<8}{theirs['step_s']:>13.3f}{ours['step_s']:>15.3f}{theirs['step_s'] / ours['step_s']:>11.2f}x"
                f"{theirs['peak_mib']:>10.0f}{ours['peak_mib']:>12.0f}{theirs['peak_mib'] / ours['peak_mib']:>10.2f}x"
            )


if __name__ == "__main__":
    main()
