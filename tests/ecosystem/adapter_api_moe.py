"""transformers' adapter API on a Qwen3-MoE model with LoRA on its fused expert parameters (`target_parameters`).
Usage: adapter_api_moe.py BASE ADAPTER OUT.

Loads ADAPTER into the model at BASE with `model.load_adapter`, writes its logits (OUT/loaded.pt), then adds a second
adapter of the same kind with `model.add_adapter` and saves it (OUT/added, OUT/added.pt: the model's logits with it
active), for the real peft to load."""

import os

import torch
from tiny import args, report, which_peft

import peft
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, out = args()
ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
model.load_adapter(adapter_dir, adapter_name="trained")
with torch.no_grad():
    torch.save(model(ids).logits, os.path.join(out, "loaded.pt"))
torch.manual_seed(3)
config = peft.LoraConfig(
    r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"], init_lora_weights=False
)
model.add_adapter(config, adapter_name="added")
model.set_adapter("added")
with torch.no_grad():
    torch.save(model(ids).logits, os.path.join(out, "added.pt"))
model.save_pretrained(os.path.join(out, "added"))
report(os.path.join(out, "result.json"), peft=which_peft(), active=model.active_adapters())
