"""BD-LoRA (`LoraConfig(use_bdlora=BdLoraConfig(...))`): LoRA whose A or B factor is block-diagonal, so that an
adapter on a tensor-parallel sharded layer needs no communication between shards when served.

A block-diagonal factor of shape (out, in) with n blocks stores its n diagonal blocks stacked, as a (out, in / n)
`weight` (PEFT's layout and file shape). Its forward multiplies each block with its slice of the input; merging
uses the dense block-diagonal matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BdLoraConfig:
    """Which targets get a block-diagonal A (`target_modules_bd_a`: row-sharded layers, e.g. `o_proj`,
    `down_proj`) or B (`target_modules_bd_b`: column-sharded layers, e.g. q/k/v, up/gate), with `nblocks` blocks
    (the serving shard count). A pattern matches a target whose name contains it. With `match_strict`, a target
    that matches neither list is an error."""

    target_modules_bd_a: list[str] | None = field(default=None)
    target_modules_bd_b: list[str] | None = field(default=None)
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ValueError(
                "Found overlapping modules in target_modules_bd lists:"
                f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B)."
            )
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ValueError(f"BdLoraConfig.nblocks must be a positive integer, got {self.nblocks!r}")


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear map (in -> out) whose matrix is block-diagonal with `nblocks` blocks."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, zero: bool) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(
                f"BD-LoRA: a {in_features} -> {out_features} factor cannot be cut into {nblocks} blocks "
                "(both sizes must be divisible by nblocks)"
            )
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks))
        self.bias = None
        if zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.nblocks
        blocks = self.weight.view(n, self.out_features // n, self.in_features // n)
        parts = x.reshape(*x.shape[:-1], n, self.in_features // n)
        out = torch.einsum("...bi,boi->...bo", parts, blocks)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The full (out, in) block-diagonal matrix."""
        return torch.block_diag(*torch.chunk(self.weight, self.nblocks, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def factor_weight(module: nn.Module) -> torch.Tensor:
    """A LoRA factor's (out, in) matrix: the dense form of a block-diagonal one."""
    return module.dense_weight() if isinstance(module, BlockDiagonalLinear) else module.weight


def apply_bdlora(layer: nn.Module, adapter_name: str, config: BdLoraConfig, target_name: str) -> None:
    """Make adapter `adapter_name`'s A or B factor on `layer` (the target `target_name`) block-diagonal."""
    in_a = any(p in target_name for p in config.target_modules_bd_a or [])
    in_b = any(p in target_name for p in config.target_modules_bd_b or [])
    if in_a and in_b:
        raise ValueError(f"Target {target_name} matches both A and B block-diagonal patterns")
    if not (in_a or in_b):
        if config.match_strict:
            raise ValueError(
                f"Target {target_name} matches neither A nor B block-diagonal patterns. If this is intentional, set "
                "match_strict=False in BdLoraConfig during initialization."
            )
        return
    if type(layer).__name__ != "Linear" or layer.use_dora.get(adapter_name):
        raise ValueError(f"BD-LoRA applies to LoRA on Linear layers without DoRA; '{target_name}' is not one")
    old = layer.lora_A[adapter_name] if in_a else layer.lora_B[adapter_name]
    new = BlockDiagonalLinear(old.in_features, old.out_features, config.nblocks, zero=in_b)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    if in_a:
        layer.lora_A[adapter_name] = new
    else:
        layer.lora_B[adapter_name] = new
