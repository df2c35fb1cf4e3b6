"""TRL's added-token path: SFTTrainer with `chat_template_path` clones a chat template that adds tokens, resizes the
embeddings and sets `trainable_token_indices` on the LoRA config. Usage: sft_added_tokens.py OUT.

Writes OUT/base (the resized base, adapters unloaded, for the oracle), OUT/final (trainer.save_model),
OUT/probe.ids.pt (input ids with the added tokens), OUT/logits.pt and OUT/result.json."""

import copy
import os

import torch
from tiny import args, files, logits, report, tiny_llama, tokenizer, which_peft

import peft
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

(out,) = args()
source = os.path.join(out, "source_tokenizer")
tok = tokenizer()
tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
tok.chat_template = "{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"
tok.save_pretrained(source)

texts = [
    "<|im_start|> " + " ".join(f"w{(i * 7 + j * 3) % 250}" for j in range(8)) + " <|im_end|>" for i in range(16)
]
lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
config = SFTConfig(
    os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], use_cpu=True,
    max_length=32, learning_rate=5e-2, logging_steps=1, seed=0, chat_template_path=source,
)  # fmt: skip
trainer = SFTTrainer(
    model=tiny_llama(), args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer(),
    peft_config=lora,
)  # fmt: skip
trainer.train()
trainer.save_model(os.path.join(out, "final"))
indices = trainer.model.peft_config["default"].trainable_token_indices
added = list(indices["embed_tokens"])
copy.deepcopy(trainer.model).unload().save_pretrained(os.path.join(out, "base"))

ids = torch.tensor([[added[0], 5, 9, 14, added[1], 3], [added[1], 40, added[0], 7, 8, 2]])
torch.save(ids, os.path.join(out, "probe.ids.pt"))
base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))
reloaded = peft.PeftModel.from_pretrained(base, os.path.join(out, "final"))
torch.save(logits(reloaded, ids), os.path.join(out, "logits.pt"))
rows = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
delta = rows["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
original = base.model.embed_tokens.weight[added]
report(
    os.path.join(out, "result.json"),
    peft=which_peft(),
    trainable_token_indices=indices,
    vocab=base.config.vocab_size,
    files=files(os.path.join(out, "final")),
    keys=sorted(rows),
    rows_trained=bool((delta - original).abs().max() > 0),
    losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
)
