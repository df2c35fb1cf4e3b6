"""accelerate's adapter-only FSDP save / load on an oxpeft model. Usage: accelerate_fsdp.py OUT.

A one-process gloo group; the PeftModel is wrapped by FSDP with `peft.utils.other.fsdp_auto_wrap_policy` (what
transformers' FSDP setup asks PEFT for). accelerate's `_get_model_state_dict(..., adapter_only=True)` (what
`save_fsdp_model` writes) must hold PEFT's keys, and `_set_model_state_dict` must load them into a fresh wrapped
model with the same outputs. Writes OUT/result.json."""

import os

import torch
import torch.distributed as dist
from tiny import IDS, args, report, tiny_llama, which_peft

import peft
from accelerate.utils import is_peft_model
from accelerate.utils.fsdp_utils import _get_model_state_dict, _set_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

(out,) = args()
dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)


def wrapped(seed: int):
    base = tiny_llama()
    torch.manual_seed(seed)  # the adapter's random weights
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model, FSDP(model, use_orig_params=True, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))


model, fsdp = wrapped(1)
with torch.no_grad():
    expected = fsdp(input_ids=IDS).logits
state = _get_model_state_dict(fsdp, adapter_only=True)
other, fsdp_other = wrapped(2)  # different random adapter weights
with torch.no_grad():
    before = fsdp_other(input_ids=IDS).logits
_set_model_state_dict(fsdp_other, state, adapter_only=True)
with torch.no_grad():
    after = fsdp_other(input_ids=IDS).logits
units = sum(isinstance(m, FSDP) for m in fsdp.modules())
dist.destroy_process_group()
report(
    os.path.join(out, "result.json"),
    peft=which_peft(),
    is_peft_model=is_peft_model(model),
    keys=sorted(state),
    fsdp_units=units,
    differs_before=bool((before - expected).abs().max() > 1e-4),
    equal_after=bool(torch.allclose(after, expected, atol=1e-6)),
)
