"""Hot-swapping LoRA adapters: replace a loaded adapter's weights (and scalings) with another adapter's, in place,
so that a compiled model serves the new adapter without recompiling.

`prepare_model_for_compiled_hotswap` (before `torch.compile`) turns the scalings into tensors and, with
`target_rank`, zero-pads every LoRA factor to that rank (zero rows of A and columns of B add nothing), so adapters
of any rank up to it and any alpha can be swapped in later. `hotswap_adapter` then loads an adapter folder or hub id
and copies its tensors into the existing ones (`hotswap_adapter_from_state_dict` for a state dict at hand). The
adapters must target the same modules; settings that change what the layers compute (rsLoRA, dropout, alpha
patterns, DoRA) must agree.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.tuners.lora import LoraConfig, LoraLayer
from oxpeft.tuners.tuners_utils import BaseTunerLayer, pattern_key
from oxpeft.utils.peft_types import PeftType

__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]

# Settings that must agree between two adapters swapped into the same layers (PEFT's list).
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _set_scaling(layer: LoraLayer, adapter_name: str, scaling: float) -> None:
    current = layer.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        current.fill_(scaling)  # in place: a compiled graph keeps reading the same tensor
    else:
        layer.scaling[adapter_name] = scaling


def _pad_factor(module: nn.Module, target_rank: int, rank_dim: int, key: str) -> None:
    """Zero-pad a LoRA factor's rank dimension (0 for A, 1 for B) to `target_rank`, in place of its weight."""
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(module, "groups", 1) != 1:
        raise ValueError(f"{key}: hot-swap padding supports Linear and ungrouped convolution LoRA factors")
    weight = module.weight
    rank = weight.shape[rank_dim]
    if rank > target_rank:
        raise ValueError(
            f"{key}: rank {rank} is larger than target_rank={target_rank}; pass the largest rank among the adapters"
        )
    if rank == target_rank:
        return
    shape = list(weight.shape)
    shape[rank_dim] = target_rank
    padded = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    padded.narrow(rank_dim, 0, rank).copy_(weight.detach())
    module.weight = nn.Parameter(padded, requires_grad=weight.requires_grad)
    for attr in ("out_features", "out_channels") if rank_dim == 0 else ("in_features", "in_channels"):
        if hasattr(module, attr):
            setattr(module, attr, target_rank)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with its first LoRA adapter loaded, before `torch.compile`, so that later hot-swaps of
    adapters with other ranks (up to `target_rank`) or alphas do not recompile. With `config` (one config or a dict
    of them), their ranks are set to `target_rank`, as the padded layers now have."""
    compiled = hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    if compiled and check_compiled == "error":
        raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
    if compiled and check_compiled == "warn":
        warnings.warn(
            "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will likely "
            "result in re-compilation, hurting performance. Call the function before compiling the model.",
            stacklevel=2,
        )
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    for layer in layers:
        device = layer.get_base_layer().weight.device if hasattr(layer.get_base_layer(), "weight") else None
        for name, value in list(layer.scaling.items()):
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), device=device)
    if target_rank is None:
        return
    for module_name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
        for name in list(layer.lora_A):
            _pad_factor(layer.lora_A[name], target_rank, 0, f"{module_name}.lora_A.{name}")
            _pad_factor(layer.lora_B[name], target_rank, 1, f"{module_name}.lora_B.{name}")
            layer.r[name] = target_rank
    for lora_config in (config.values() if isinstance(config, dict) else [config] if config else []):
        lora_config.r = target_rank
        for key in lora_config.rank_pattern or {}:
            lora_config.rank_pattern[key] = target_rank


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise a ValueError if adapter `config1` cannot be hot-swapped into one loaded with `config0`."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {config0.peft_type.value} and {config1.peft_type.value}")
    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(
            f"Hotswapping only supports {', '.join(t.value for t in CONFIG_KEYS_TO_CHECK)} but "
            f"{config0.peft_type.value} was passed."
        )
    first, second = config0.to_dict(), config1.to_dict()
    for key in CONFIG_KEYS_TO_CHECK[config0.peft_type]:
        if first.get(key) != second.get(key):
            raise ValueError(f"Configs are incompatible: for {key}, {first.get(key)} != {second.get(key)}")


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Copy the tensors of `state_dict` (keyed as `model`'s own state dict, adapter name included) into the
    adapter `adapter_name`, and set each layer's scaling from `config`. Tensors of the old adapter that the new one
    lacks become zero. Everything is checked before anything is written (a RuntimeError / ValueError otherwise)."""
    if any(adapter_name in m.merged_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. Please "
            "unmerge the adapter first by calling `peft_model.unmerge_adapter()`."
        )
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if parameter_prefix in k and f".{adapter_name}" in k}
    prefix = "_orig_mod." if hasattr(model, "_orig_mod") else ""
    unexpected = [k for k in state_dict if prefix + k not in own and k not in own]
    if unexpected:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(sorted(unexpected))}."
        )
    plan: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    for key, new in state_dict.items():
        old = own.get(prefix + key, own.get(key))
        if old.shape == new.shape:
            plan.append((old, new, "copy"))
        elif old.dim() == new.dim() and all(o >= n for o, n in zip(old.shape, new.shape)):
            plan.append((old, new, "pad"))
        else:
            raise ValueError(
                f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs {tuple(new.shape)}. Please "
                "ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                "peft.utils.hotswap.prepare_model_for_compiled_hotswap."
            )
    with torch.no_grad():
        given = {prefix + k for k in state_dict} | set(state_dict)
        for key, tensor in own.items():
            if key not in given:
                tensor.zero_()
        for old, new, how in plan:
            new = new.to(device=old.device, dtype=old.dtype)
            if how == "pad":
                old.zero_()
                old[tuple(slice(0, n) for n in new.shape)].copy_(new)
            else:
                old.copy_(new)
    for module_name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)):
        if adapter_name not in layer.scaling:
            continue
        key = module_name.removeprefix("_orig_mod.").removeprefix("base_model.model.")
        rank_key = pattern_key(config.rank_pattern or {}, key)
        alpha_key = pattern_key(config.alpha_pattern or {}, key, field="alpha_pattern")
        rank = config.rank_pattern[rank_key] if rank_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        _set_scaling(layer, adapter_name, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: str | None = None, **kwargs: Any
) -> None:
    """Replace the weights of the loaded adapter `adapter_name` of `model` (a PeftModel) by those of the adapter at
    `model_name_or_path` (a folder or hub id; `kwargs` go to the download), keeping its name."""
    from oxpeft.utils.save_and_load import adapter_key_map, load_peft_weights

    config = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    check_hotswap_configs_compatible(model.active_peft_config, config)
    where = {k: kwargs[k] for k in ("subfolder", "revision", "token") if k in kwargs}
    weights = load_peft_weights(model_name_or_path, device=torch_device, **where)
    by_file = {ckpt: model_key for model_key, ckpt in adapter_key_map(model, adapter_name).items()}
    mapped = {by_file.get(k, k): v for k, v in weights.items()}
    hotswap_adapter_from_state_dict(model, mapped, adapter_name, config)
