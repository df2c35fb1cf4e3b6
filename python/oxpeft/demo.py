"""`oxpeft demo`: fine-tune a tiny built-in Llama with LoRA, save, reload, merge, and check the outputs agree.

Everything is built locally (model from a config, byte-level tokens from built-in text), so the demo runs
offline in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from oxpeft._io import refuse_existing

DEMO_TEXT = (
    "Low-rank adapters train a small pair of matrices beside each frozen weight. The base model stays as it "
    "was, and the adapter learns the change. A rank of eight is often enough to steer a model toward a new "
    "task, and the adapter file is a few megabytes where the model is many gigabytes. When training is done "
    "the adapter can be merged into the weights, so serving costs nothing extra. "
    "The quick brown fox jumps over the lazy dog while the patient owl watches from the old oak tree. "
    "Rivers carve valleys over thousands of years; the water carries sand, the sand settles, and new land "
    "forms where the river meets the sea. "
)


@dataclass
class DemoResult:
    first_loss: float
    last_loss: float
    reload_max_diff: float
    merge_max_diff: float
    #: Where the adapter was saved; None when it went to a temporary folder that was removed afterwards.
    adapter_dir: str | None

    @property
    def ok(self) -> bool:
        return self.last_loss < self.first_loss and self.reload_max_diff < 1e-5 and self.merge_max_diff < 1e-4


def _tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _batches(tokens: torch.Tensor, steps: int, batch: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=gen)
        yield torch.stack([tokens[s : s + length] for s in starts.tolist()])


def run_demo(
    steps: int = 60,
    output_dir: str | None = None,
    seed: int = 0,
    show_progress: bool = True,
    force: bool = False,
) -> DemoResult:
    """Train, save, reload, merge; returns the losses and the largest output differences.

    The adapter is saved in `output_dir`, which must not exist unless `force`; without one it goes to a
    temporary folder that is removed before returning.
    """
    if steps < 10:
        raise ValueError(f"the demo needs at least 10 training steps to show the loss going down, got {steps}")
    if output_dir is not None:
        refuse_existing(output_dir, force)  # before training, so nothing is lost to a refusal
        return _train_save_reload(steps, output_dir, seed, show_progress)
    with tempfile.TemporaryDirectory(prefix="oxpeft-demo-") as scratch:
        result = _train_save_reload(steps, scratch, seed, show_progress)
    result.adapter_dir = None
    return result


def _train_save_reload(steps: int, adapter_dir: str, seed: int, show_progress: bool) -> DemoResult:
    from oxpeft import LoraConfig, PeftModel, get_peft_model

    tokens = torch.tensor(list(DEMO_TEXT.encode("utf-8")), dtype=torch.long)
    model = get_peft_model(
        _tiny_llama(seed), LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"], task_type="CAUSAL_LM"
        )
    )
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses: list[float] = []
    bar = tqdm(_batches(tokens, steps, batch=8, length=64, seed=seed), total=steps, desc="LoRA fine-tuning",
               disable=not show_progress)
    for batch in bar:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()

    model.save_pretrained(adapter_dir)
    probe = tokens[:96].unsqueeze(0)
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(_tiny_llama(seed), adapter_dir)
        reload_diff = (reloaded(input_ids=probe).logits - trained).abs().max().item()
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(input_ids=probe).logits - trained).abs().max().item()
    return DemoResult(
        first_loss=sum(losses[:5]) / 5,
        last_loss=sum(losses[-5:]) / 5,
        reload_max_diff=reload_diff,
        merge_max_diff=merge_diff,
        adapter_dir=os.path.abspath(adapter_dir),
    )


def print_report(result: DemoResult) -> None:
    print(f"loss: {result.first_loss:.3f} (first 5 steps) -> {result.last_loss:.3f} (last 5 steps)")
    if result.adapter_dir is None:
        print("adapter saved in PEFT format to a temporary folder, now removed (--output-dir DIR keeps it)")
    else:
        print(f"adapter saved in PEFT format: {result.adapter_dir}")
    print(f"reloaded adapter vs trained model: max |logit diff| = {result.reload_max_diff:.2e}")
    print(f"merged model vs trained model:     max |logit diff| = {result.merge_max_diff:.2e}")
    print("demo OK" if result.ok else "demo FAILED")
