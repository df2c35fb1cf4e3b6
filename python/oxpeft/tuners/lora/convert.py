"""Turning a PiSSA / OLoRA adapter into a plain LoRA adapter for the unmodified base model.

PiSSA and OLoRA initialise the adapter from the base weight and subtract it from the base: W = W_res + B0 A0.
After training, W_res + B A stands for W + dW with dW = B A - B0 A0 = [B | -B0] [A ; A0], a LoRA of twice the
rank. Saving that (with the scaling kept) gives an adapter any PEFT user can load on the original base model,
and several of them can be swapped on one base. `PeftModel.save_pretrained(...,
path_initial_model_for_weight_conversion=DIR)` does it, with DIR holding the adapter as saved right after
`get_peft_model`, before training.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch

# Tensors whose rank dimension is the first (A factors) or the second (B factors).
_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")


def check_convertible(config: Any) -> None:
    """Refuse configs whose adapters cannot be rewritten as a LoRA of twice the rank."""
    if getattr(config, "peft_type", None) != "LORA":  # PeftType is a str enum
        raise ValueError("path_initial_model_for_weight_conversion only applies to LoRA adapters (PiSSA / OLoRA)")
    if config.use_dora:
        raise ValueError(
            "path_initial_model_for_weight_conversion cannot convert a DoRA adapter: DoRA's weight normalisation "
            "of W_res + BA is not W + a low-rank delta"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "path_initial_model_for_weight_conversion with use_rslora and rank_pattern/alpha_pattern is not "
            "supported: doubling the ranks cannot keep every module's scaling"
        )
    init = str(config.init_lora_weights).lower()
    if not (init.startswith("pissa") or init.startswith("olora") or init == "true"):
        warnings.warn(
            f"init_lora_weights={config.init_lora_weights!r} does not change the base weights; converting with "
            "path_initial_model_for_weight_conversion only makes sense for PiSSA / OLoRA adapters",
            stacklevel=3,
        )


def converted_tensors(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], initial_dir: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """[A ; A0] and [B | -B0] for every LoRA factor; other tensors (modules_to_save, biases) unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        is_a, is_b = key.endswith(_A_SUFFIXES), key.endswith(_B_SUFFIXES)
        if not (is_a or is_b):
            out[key] = value
            continue
        if key not in initial:
            raise ValueError(
                f"{os.fspath(initial_dir)}: the initial adapter has no tensor '{key}'; save the adapter right after "
                "get_peft_model with the same config and pass that directory"
            )
        start = initial[key].to(device=value.device, dtype=value.dtype)
        dim = 0 if is_a else 1
        other = 1 - dim
        if start.dim() != 2 or value.dim() != 2 or start.shape[other] != value.shape[other]:
            raise ValueError(
                f"{os.fspath(initial_dir)}: initial tensor '{key}' has shape {tuple(start.shape)}, which does not "
                f"pair with the trained {tuple(value.shape)}"
            )
        out[key] = torch.cat([value, start if is_a else -start], dim=dim)
    return out


def converted_config_fields(config: Any) -> dict[str, Any]:
    """Config fields of the converted adapter: double ranks, scalings kept."""
    fields: dict[str, Any] = {"init_lora_weights": True, "r": 2 * config.r}
    # scaling = alpha / r (alpha / sqrt(r) with rsLoRA) must stay what it was at twice the rank.
    fields["lora_alpha"] = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    if config.rank_pattern:
        fields["rank_pattern"] = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        fields["alpha_pattern"] = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return fields
