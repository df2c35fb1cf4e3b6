"""The real HF PEFT loads a saved adapter. Usage: peft_oracle.py ADAPTER_DIR BASE_DIR OUT_PT [nf4 | IDS_PT].

Loads the base model from BASE_DIR (quantised to NF4 by bitsandbytes with `nf4`, the QLoRA recipe oxpeft uses),
the adapter with `PeftModel.from_pretrained`, and saves its logits on the probe input (or the input ids saved in
IDS_PT) to OUT_PT."""

import torch
from tiny import args, logits, which_peft

import peft
from transformers import AutoModelForCausalLM

adapter, base_dir, out_pt, *rest = args()
assert which_peft() == "peft", "the oracle must run on the real peft"
kwargs = {}
ids = torch.load(rest[0]) if rest and rest[0].endswith(".pt") else None
if rest == ["nf4"]:
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
model = peft.PeftModel.from_pretrained(base, adapter)
torch.save(logits(model, ids), out_pt)
