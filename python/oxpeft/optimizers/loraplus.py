"""LoRA+ (Hayou et al., 2024, https://arxiv.org/abs/2402.12354): train B with a larger learning rate than A."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from oxpeft.tuners.lora.layer import Embedding

__all__ = ["create_loraplus_optimizer"]


def _decayed(model: nn.Module) -> set[str]:
    """Names of the parameters that take weight decay: all but biases and those of normalisation layers."""
    names = set()
    for module_name, module in model.named_modules():
        norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            if not norm and "bias" not in name:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> Optimizer:
    """An `optimizer_cls` over `model`'s trainable parameters in LoRA+'s four groups, as HF PEFT makes them:

    - A matrices (and every other trainable matrix): `lr`, weight decay `loraplus_weight_decay` (default 0);
    - B matrices: `lr * loraplus_lr_ratio`, the same weight decay; biases and other 1-D parameters (DoRA
      magnitudes): `lr * loraplus_lr_ratio`, no weight decay;
    - LoRA on embeddings: `loraplus_lr_embedding` (default 1e-6).

    Other keyword arguments go to the optimizer.
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"create_loraplus_optimizer: loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio}")
    decay = _decayed(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A tuner layer's parameters sit two levels below it (`<layer>.lora_embedding_A.<adapter>`).
        owner = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(owner, Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    kwargs["lr"] = lr
    param_groups = [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": embedding_lr},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls(param_groups, **kwargs)
