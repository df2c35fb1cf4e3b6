"""Offline merge of LoRA adapters trained with `ensure_weight_tying=True` on a model with tied embeddings.

Such an adapter holds the input embedding's LoRA and, for each output layer tied to it, the same factors transposed
(lora_A = lora_embedding_B^T, lora_B = lora_embedding_A^T) and a copy of the shared weight (`base_layer.weight`);
or, with the embedding in `modules_to_save`, its trained copy under both layers' names. A checkpoint of a tied model
stores the shared weight once, under the embedding's name: merging into it is the whole merge, so the tied layer's
tensors are left out (after checking that they are the embedding's). A checkpoint that stores the output layer's
weight too gets the same change in both.
"""

from __future__ import annotations

import json
from pathlib import Path

_PREFIX = "base_model.model."


def needs_conversion(config: dict) -> bool:
    return config.get("peft_type") == "LORA" and bool(config.get("ensure_weight_tying"))


def _saved_embeddings(tensors: dict, tensors_of_base: dict) -> list[str]:
    """The adapter's module prefixes whose full weight it saves (modules_to_save) and the checkpoint holds."""
    return [k[: -len(".weight")] for k in tensors if "lora_" not in k and k.endswith(".weight") and k[len(_PREFIX) :] in tensors_of_base]


def convert(config: dict, weights: Path, base: Path, tensors_of_base: dict, out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    embeddings = [k[: -len(".lora_embedding_A")] for k in tensors if k.endswith(".lora_embedding_A")]
    dropped: set[str] = set()
    for a_key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = a_key[: -len(".lora_A.weight")]
        if f"{module[len(_PREFIX):]}.weight" in tensors_of_base:
            continue  # the checkpoint stores this layer's own weight: its delta is merged into it
        b_key = f"{module}.lora_B.weight"
        tied_to = [
            e for e in embeddings
            if b_key in tensors
            and tensors[a_key].shape == tensors[f"{e}.lora_embedding_B"].t().shape
            and torch.equal(tensors[a_key], tensors[f"{e}.lora_embedding_B"].t())
            and torch.equal(tensors[b_key], tensors[f"{e}.lora_embedding_A"].t())
        ]
        if not tied_to:
            continue  # not a tied layer: the Rust planner names the missing base tensor
        dropped |= {a_key, b_key, f"{module}.base_layer.weight"}
    # modules_to_save: the tied layer's trained copy is the embedding's (one weight, saved under both names).
    saved = [tensors[f"{e}.weight"] for e in _saved_embeddings(tensors, tensors_of_base)]
    for key, value in tensors.items():
        name = key[len(_PREFIX) :]
        if "lora_" in key or name in tensors_of_base or key in dropped:
            continue
        if any(torch.equal(value, copy) for copy in saved):
            dropped.add(key)
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    result = out / "adapter_model.safetensors"
    save_file(kept, str(result), metadata={"format": "pt"})
    return result
