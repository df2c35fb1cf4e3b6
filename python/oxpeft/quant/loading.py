"""`load_quantized`: build a model on the meta device and quantise its checkpoint tensor by tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from oxpeft.quant.config import QuantizationConfig
from oxpeft.quant.linear4bit import Linear4bit
from oxpeft.quant.linear8bit import Linear8bit
from oxpeft.quant.model import linear_names_to_quantize

__all__ = ["load_quantized"]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = [model_dir / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: checkpoint file not found")
    return files


def _meta_model(model_dir: Path, model_class: Any, dtype: Optional[torch.dtype]) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if dtype is None:
            return model_class.from_config(config)
        return model_class.from_config(config, dtype=dtype)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        target = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{key}: checkpoint shape {list(value.shape)} does not match the model's {list(old.shape)}")
        owner._parameters[leaf] = nn.Parameter(value.to(target), requires_grad=old.requires_grad if old is not None else True)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(key)


def _owner_module(key: str) -> str:
    """The module a checkpoint key belongs to, including bitsandbytes' quantisation entries."""
    for marker in (".weight.", ".SCB", ".weight_format"):
        if marker in key:
            return key.split(marker)[0]
    return key.rpartition(".")[0]


def _materialise_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers computed at construction (rotary `inv_freq`, ...) are not in checkpoints; rebuild
    them on CPU with the model's own initialiser."""
    init = getattr(model, "_init_weights", None)
    for name, module in model.named_modules():
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        for b in meta:
            module._buffers[b] = torch.empty_like(module._buffers[b], device="cpu")
        if not callable(init):
            raise ValueError(f"{name}: buffers {meta} are not in the checkpoint and the model cannot initialise them")
        init(module)


def load_quantized(
    model_dir: str | os.PathLike,
    config: Optional[QuantizationConfig] = None,
    model_class: Any = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Loads a transformers model from `model_dir` with its Linear layers quantised.

    The model is built on the meta device, then each tensor is read from the (mmapped)
    safetensors checkpoint and either quantised straight into its `Linear4bit` / `Linear8bit`
    or placed as is, so peak memory stays near the quantised model's size. A checkpoint that is
    already quantised in bitsandbytes' layout (`weight.absmax`, `SCB`, ...) is loaded without
    requantising. `dtype`, when given, casts the tensors that stay in full precision; by default
    they keep the checkpoint's dtype. Returns the model in eval mode on CPU.
    """
    from safetensors import safe_open

    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    config = config or QuantizationConfig()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    files = _checkpoint_files(model_dir)
    model = _meta_model(model_dir, model_class, dtype)
    targets = set(linear_names_to_quantize(model, config))
    for name in targets:
        linear = model.get_submodule(name)
        if config.load_in_4bit:
            module: nn.Module = Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=config.compute_dtype,
                quant_type=config.bnb_4bit_quant_type,
                compress_statistics=config.bnb_4bit_use_double_quant,
                blocksize=config.blocksize,
                device="meta",
            )
        else:
            module = Linear8bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=config.compute_dtype, device="meta"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    # Entries of quantised layers other than a full-precision weight: biases and, for a
    # checkpoint saved already quantised, the packed weight and its quantisation state.
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                module_name = _owner_module(key)
                if module_name in targets:
                    tensor = reader.get_tensor(key)
                    if key == f"{module_name}.weight" and tensor.is_floating_point():
                        model.get_submodule(module_name)._set_weight(tensor, name=f"{path.name}: {key}")
                    else:
                        pending.setdefault(module_name, {})[key[len(module_name) + 1 :]] = tensor
                    del tensor
                    continue
                try:
                    _set_tensor(model, key, reader.get_tensor(key), dtype)
                except KeyError:
                    continue  # a tensor the architecture does not use (e.g. an old rotary buffer)
    for module_name, items in pending.items():
        module = model.get_submodule(module_name)
        if set(items) == {"bias"}:
            module.bias = nn.Parameter(items["bias"].to(dtype or module.bias.dtype), requires_grad=True)
            continue
        try:
            module.load_state_dict(items, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{model_dir}: pre-quantised entries of {module_name} do not fit: {exc}") from None

    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    _materialise_non_persistent_buffers(model)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and (module.weight.is_meta or module.quant_state.absmax.is_meta):
            missing.append(f"{name}.weight")
        if isinstance(module, Linear8bit) and module.SCB.is_meta:
            missing.append(f"{name}.SCB")
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {sorted(set(missing))[:5]}")
    model.is_loaded_in_4bit = bool(config.load_in_4bit)
    model.is_loaded_in_8bit = bool(config.load_in_8bit)
    return model.eval()
