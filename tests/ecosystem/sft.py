"""TRL's SFTTrainer, 3 steps. Usage: sft.py OUT {config|wrapped} {lora|qlora}.

`config` passes `peft_config=LoraConfig(...)` to the trainer; `wrapped` passes a model already wrapped by
`get_peft_model`. `qlora` quantises the base to NF4 with oxpeft first (`prepare_model_for_kbit_training`
included). Writes OUT/base (the full-precision base, for the oracle), OUT/final (trainer.save_model),
OUT/logits.pt and OUT/result.json."""

import os

import torch
from tiny import args, files, logits, report, text_dataset, tiny_llama, tokenizer, which_peft

import peft
from trl import SFTConfig, SFTTrainer

out, entry, method = args()
model = tiny_llama()
model.save_pretrained(os.path.join(out, "base"))
if method == "qlora":
    import oxpeft

    model = oxpeft.quantize_model(model, oxpeft.QuantizationConfig(load_in_4bit=True))
    model = peft.prepare_model_for_kbit_training(model)
lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
extra = {}
if entry == "config":
    extra["peft_config"] = lora
else:
    model = peft.get_peft_model(model, lora)
config = SFTConfig(
    os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], use_cpu=True,
    max_length=32, learning_rate=1e-2, logging_steps=1, seed=0,
)  # fmt: skip
trainer = SFTTrainer(model=model, args=config, train_dataset=text_dataset(), processing_class=tokenizer(), **extra)
trainer.train()
trainer.save_model(os.path.join(out, "final"))
# The saved adapter on a fresh base, read back by oxpeft (the trainer's own model may still run under its mixed-
# precision autocast); the oracle must get the same logits from the same files.
base = tiny_llama()
if method == "qlora":
    base = oxpeft.quantize_model(base, oxpeft.QuantizationConfig(load_in_4bit=True))
reloaded = peft.PeftModel.from_pretrained(base, os.path.join(out, "final"))
torch.save(logits(reloaded), os.path.join(out, "logits.pt"))
changed = bool((logits(reloaded) - logits(tiny_llama())).abs().max() > 1e-4)
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
report(
    os.path.join(out, "result.json"),
    peft=which_peft(),
    model_class=type(trainer.model).__module__ + "." + type(trainer.model).__name__,
    is_peft_model=__import__("accelerate").utils.is_peft_model(trainer.model),
    files=files(os.path.join(out, "final")),
    checkpoint=files(os.path.join(out, "run")),
    losses=losses,
    adapter_changes_output=changed,
)
