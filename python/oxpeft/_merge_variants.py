"""Offline merge of LoRA variants whose files hold more than plain LoRA factors.

- BD-LoRA (`use_bdlora`): block-diagonal factors are stored as stacked blocks ((out, in / n) rather than
  (out, in)); written out as the dense block-diagonal matrices they stand for (the added zeros leave every product
  exactly as it was).
- VeLoRA (`velora_config`): its projection vectors (`lora_velora_embed`) only shape training gradients; the merged
  delta is plain LoRA's, so they are left out.
- MonteCLoRA (`monteclora_config`): its sampler state (`lora_monteclora_sampler.*`) only perturbs lora_A in training;
  it merges as plain LoRA (as PEFT merges it), so the state is left out.

The result is a plain LoRA adapter that the Rust merge applies."""

from __future__ import annotations

import json
from pathlib import Path

_PREFIX = "base_model.model."


_VARIANTS = ("use_bdlora", "velora_config", "monteclora_config")
_TRAINING_ONLY = (".lora_velora_embed", ".lora_monteclora_sampler.")


def needs_conversion(config: dict) -> bool:
    return config.get("peft_type") == "LORA" and any(config.get(v) for v in _VARIANTS)


def convert(config: dict, weights: Path, base: Path, tensors_of_base: dict, out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    settings = config.get("use_bdlora")
    blocks = int(settings.get("nblocks", 1)) if isinstance(settings, dict) else 1
    shapes = {name: shape for name, (shape, _) in tensors_of_base.items()}
    tensors = {k: v for k, v in load_file(str(weights)).items() if not any(t in k + "." for t in _TRAINING_ONLY)}
    for a_key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        b_key = a_key.replace(".lora_A.weight", ".lora_B.weight")
        target = a_key[len(_PREFIX) : -len(".lora_A.weight")] + ".weight"
        if target not in shapes or b_key not in tensors or blocks == 1:
            continue  # the Rust planner names what does not fit
        a, b = tensors[a_key], tensors[b_key]
        rank, in_features = a.shape[0], shapes[target][1]
        # Dense, lora_A is (r, in) and lora_B (out, r); a block-diagonal one keeps 1/n of its second dimension.
        if a.shape[1] * blocks == in_features:
            tensors[a_key] = torch.block_diag(*torch.chunk(a, blocks, dim=0)).contiguous()
        if b.shape[1] * blocks == rank:
            tensors[b_key] = torch.block_diag(*torch.chunk(b, blocks, dim=0)).contiguous()
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in _VARIANTS}))
    result = out / "adapter_model.safetensors"
    save_file(tensors, str(result), metadata={"format": "pt"})
    return result
