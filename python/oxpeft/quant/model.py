"""Quantising a whole model in place, and preparing a quantised model for training."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from oxpeft.quant.config import QuantizationConfig
from oxpeft.quant.linear4bit import Linear4bit
from oxpeft.quant.linear8bit import Linear8bit

__all__ = ["quantize_model", "prepare_model_for_kbit_training", "linear_names_to_quantize"]


def _skipped(name: str, skip: list[str]) -> bool:
    dotted = f".{name}."
    return any(name == s or name.endswith("." + s) or f".{s}." in dotted for s in skip)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}


def linear_names_to_quantize(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """Names of the `nn.Linear` modules `quantize_model` replaces: all of them except the output
    embedding and those matched by `config.skip_modules` (exact name, name suffix after a dot,
    or a whole path component)."""
    keep = _output_embedding_names(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in keep and not _skipped(name, config.skip_modules)
    ]


def _quantised_copy(linear: nn.Linear, config: QuantizationConfig, name: str) -> nn.Module:
    if config.load_in_4bit:
        return Linear4bit.from_linear(
            linear,
            compute_dtype=config.compute_dtype,
            quant_type=config.bnb_4bit_quant_type,
            compress_statistics=config.bnb_4bit_use_double_quant,
            blocksize=config.blocksize,
            name=f"{name}.weight",
        )
    return Linear8bit.from_linear(
        linear, compute_dtype=config.compute_dtype, name=f"{name}.weight", threshold=config.llm_int8_threshold
    )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, config: Optional[QuantizationConfig] = None) -> nn.Module:
    """Replaces the model's `nn.Linear` layers with `Linear4bit` / `Linear8bit` in place and
    returns the model. Every layer is quantised before any is swapped in, so an error (NaN
    weights, say) leaves the model unchanged. Marks the model with `is_loaded_in_4bit` /
    `is_loaded_in_8bit` as transformers does."""
    config = config or QuantizationConfig()
    names = linear_names_to_quantize(model, config)
    if config.skip_modules:
        all_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        unmatched = [s for s in config.skip_modules if not any(_skipped(n, [s]) for n in all_names)]
        if unmatched:
            raise ValueError(f"quantize_model: skip_modules entries {unmatched} match no Linear layer")
    replacements = [(name, _quantised_copy(model.get_submodule(name), config, name)) for name in names]
    for name, module in replacements:
        _replace(model, name, module)
    model.is_loaded_in_4bit = bool(config.load_in_4bit)
    model.is_loaded_in_8bit = bool(config.load_in_8bit)
    return model


def _make_inputs_require_grad(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        raise ValueError("prepare_model_for_kbit_training: the model has no input embeddings to hook for gradient checkpointing")
    embeddings.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
    upcast_norms: bool = False,
) -> nn.Module:
    """Readies a quantised model for adapter training and returns it.

    Freezes every base parameter; with `use_gradient_checkpointing`, enables it (passing
    `gradient_checkpointing_kwargs`, default `{"use_reentrant": False}`) and makes the embedding output require grad, so that
    checkpointed blocks still see an input with a grad path (the "element 0 of tensors does not
    require grad" failure). With `upcast_norms`, LayerNorm / RMSNorm weights in 16 bits are cast
    to float32. Unlike PEFT, the other 16-bit parameters (embeddings, lm_head) are NOT upcast to
    float32 — that upcast is what costs PEFT users a gigabyte or more.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if upcast_norms:
        for module in model.modules():
            kind = type(module).__name__
            if isinstance(module, nn.LayerNorm) or "LayerNorm" in kind or "RMSNorm" in kind:
                params = [p for p in module.parameters(recurse=False) if p.dtype in (torch.float16, torch.bfloat16)]
                for param in params:
                    param.data = param.data.float()
                if params:
                    # The norm computes in fp32; its output keeps the input's dtype so 16-bit layers downstream still fit.
                    module.register_forward_hook(_output_in_input_dtype)
    if use_gradient_checkpointing:
        _make_inputs_require_grad(model)
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        # transformers >= 5 renamed gradient checkpointing to activation checkpointing.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if callable(enable):
            enable(activation_checkpointing_kwargs=kwargs)
        elif callable(getattr(model, "gradient_checkpointing_enable", None)):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"prepare_model_for_kbit_training: {type(model).__name__} does not support gradient checkpointing")
    return model


def _output_in_input_dtype(_module: nn.Module, inputs: tuple, output: Any) -> Any:
    if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(inputs[0].dtype)
    return output
