"""transformers' own adapter API on a plain transformers model. Usage: adapter_api.py OUT.

add_adapter / set_adapter / disable_adapters / enable_adapters / active_adapters / get_adapter_state_dict /
delete_adapter / save_pretrained / load_adapter, then AutoModelForCausalLM.from_pretrained(adapter_dir) finding the
base through base_model_name_or_path. Writes OUT/base, OUT/saved (the adapter), OUT/logits.pt (the adapted model's
logits) and OUT/result.json."""

import os

import torch
from tiny import args, files, logits, report, tiny_llama, which_peft

import peft
from transformers import AutoModelForCausalLM

(out,) = args()
base_dir, saved = os.path.join(out, "base"), os.path.join(out, "saved")
tiny_llama().save_pretrained(base_dir)
model = AutoModelForCausalLM.from_pretrained(base_dir)
plain = logits(model)
steps = {}

torch.manual_seed(1)
model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="first")
first = logits(model)
steps["add_adapter changes the output"] = bool((first - plain).abs().max() > 1e-4)
model.add_adapter(peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), adapter_name="second")
second = logits(model)
steps["add_adapter activates the new adapter"] = model.active_adapters() == ["second"] and not torch.equal(second, first)
steps["both adapters are known"] = sorted(model.peft_config) == ["first", "second"]
model.set_adapter("first")
steps["set_adapter switches"] = model.active_adapters() == ["first"] and torch.equal(logits(model), first)
model.set_adapter("second")
model.disable_adapters()
steps["disable_adapters gives the base model"] = torch.equal(logits(model), plain)
model.enable_adapters()
steps["enable_adapters brings it back"] = torch.equal(logits(model), second)
state = model.get_adapter_state_dict("first")
steps["get_adapter_state_dict has PEFT's keys"] = sorted(state) == sorted(
    f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight" for i in range(2) for p in "qv" for ab in "AB"
)
model.delete_adapter("second")
model.set_adapter("first")
steps["delete_adapter keeps the other"] = list(model.peft_config) == ["first"] and torch.equal(logits(model), first)
model.save_pretrained(saved)  # the active adapter, adapter-only

fresh = AutoModelForCausalLM.from_pretrained(base_dir)
fresh.load_adapter(saved, adapter_name="loaded")
steps["load_adapter gives the same outputs"] = torch.allclose(logits(fresh), first, atol=1e-6)

# The adapter folder alone: transformers finds the base through the adapter config's base_model_name_or_path.
whole = AutoModelForCausalLM.from_pretrained(saved)
steps["from_pretrained(adapter_dir) gives the same outputs"] = torch.allclose(logits(whole), first, atol=1e-6)
torch.save(first, os.path.join(out, "logits.pt"))
report(os.path.join(out, "result.json"), peft=which_peft(), steps=steps, saved=files(saved))
