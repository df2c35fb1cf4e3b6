"""Offline merge of trainable tokens: the `TRAINABLE_TOKENS` method and LoRA's `trainable_token_indices`.

An adapter of either kind holds, for an embedding layer, the full rows of a few tokens (`trainable_tokens_delta`,
despite the name the rows themselves, not differences). Merging writes them over the base's rows. This module
turns such an adapter into one the Rust merge applies: the embedding with the rows written in becomes a whole-tensor
replacement (as `modules_to_save` is merged, so the exact-unmerge sidecar keeps the original and unmerge gives it
back bit for bit), and LoRA tensors stay as they are. The rows are cast to the checkpoint's dtype, as PEFT's merge
casts them.

Writing the replacement reads that one embedding tensor into memory (the rest of the merge still streams).
"""

from __future__ import annotations

import json
from pathlib import Path

_PREFIX = "base_model.model."
_ROWS = "trainable_tokens_delta"


def needs_conversion(config: dict) -> bool:
    return config.get("peft_type") == "TRAINABLE_TOKENS" or (
        config.get("peft_type") == "LORA" and config.get("trainable_token_indices") is not None
    )


def convert(config: dict, weights: Path, base: Path, tensors_of_base: dict, out: Path) -> Path:
    """Write the adapter (`config`, `weights`) for checkpoint `base` (whose tensors are `tensors_of_base`: name ->
    (shape, shard)) with its token rows as embedding replacements into the new folder `out`; returns its weights
    file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    shapes = {name: shape for name, (shape, _) in tensors_of_base.items()}
    converted = {k: v for k, v in tensors.items() if not k.endswith(_ROWS)}
    for key in sorted(k for k in tensors if k.endswith(_ROWS)):
        module = key[len(_PREFIX) : -len(_ROWS) - 1].removesuffix(".token_adapter")
        target = f"{module}.weight"
        if target not in shapes:
            if module.endswith("lm_head"):
                continue  # a tied output layer the checkpoint does not store: it is the embedding
            raise ValueError(f"tensor '{key}': the checkpoint {base} has no '{target}' to write the rows into")
        indices = _indices_for(config, module, key)
        rows = tensors[key]
        if rows.shape[0] != len(indices) or list(rows.shape[1:]) != shapes[target][1:]:
            raise ValueError(
                f"tensor '{key}' has shape {list(rows.shape)}, but {len(indices)} rows of '{target}' "
                f"({shapes[target]}) are listed"
            )
        outside = [i for i in indices if i >= shapes[target][0]]
        if outside:
            raise ValueError(f"tensor '{key}': token indices {outside[:5]} are outside '{target}' ({shapes[target]})")
        with safe_open(str(base / tensors_of_base[target][1]), "pt") as f:
            weight = f.get_tensor(target)
        weight = weight.index_copy(0, torch.tensor(indices), rows.to(weight.dtype))
        converted[f"{_PREFIX}{target}"] = weight
    out.mkdir()
    new_config = {k: v for k, v in config.items() if k not in ("trainable_token_indices", "token_indices", "init_weights")}
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        # Only replacements are left: an empty LoRA adapter carries them.
        new_config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": []}
    (out / "adapter_config.json").write_text(json.dumps(new_config))
    result = out / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(result), metadata={"format": "pt"})
    return result


def _indices_for(config: dict, module: str, key: str) -> list[int]:
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        return list(config["token_indices"])
    indices = config["trainable_token_indices"]
    if not isinstance(indices, dict):
        return list(indices)
    for layer, rows in indices.items():
        if module == layer or module.endswith("." + layer):
            return list(rows)
    raise ValueError(f"tensor '{key}': trainable_token_indices names no layer '{module}'")
