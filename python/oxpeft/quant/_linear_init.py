"""The nn.Linear-style initialisation shared by Linear4bit and Linear8bit."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def init_like_linear(
    module: nn.Module,
    bias: bool,
    compute_dtype: torch.dtype,
    device: Optional[torch.device | str],
) -> None:
    """Quantise a weight initialised as nn.Linear's into `module` (via its `set_weight`) and give it a bias
    initialised the same way; on the meta device only the shapes are made."""
    init = torch.empty(module.out_features, module.in_features, dtype=compute_dtype, device=device)
    if init.device.type != "meta":
        nn.init.kaiming_uniform_(init, a=math.sqrt(5))
    module.set_weight(init)
    if bias:
        module.bias = nn.Parameter(torch.empty(module.out_features, dtype=compute_dtype, device=device))
        if module.bias.device.type != "meta":
            bound = 1 / math.sqrt(module.in_features)
            nn.init.uniform_(module.bias, -bound, bound)
    else:
        module.register_parameter("bias", None)


def copy_bias(module: nn.Module, linear: nn.Linear) -> None:
    """Give a quantised layer made by `from_linear` the linear's bias, as it is."""
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
