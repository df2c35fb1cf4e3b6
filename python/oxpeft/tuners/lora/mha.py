"""LoRA on `nn.MultiheadAttention` (query, key and value of the same size): one LoRA pair on the packed
`in_proj_weight` (3 * embed x embed) and a LoRA `Linear` on `out_proj`, as PEFT lays them out (the latter inside the
wrapped module, saved as `<name>.base_layer.out_proj.lora_*`).

torch's attention reads both weights directly rather than calling a Linear's forward, so the forward runs torch's
attention function with `W + delta` passed for both (nothing is written into the module, gradients reach the
adapters, and FSDP's parameter views are read as they are). This layer owns the `out_proj` layer: switching, merging, deleting and unloading
act on both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.tuners.lora.layer import Linear, LoraLayer


class MultiheadAttention(nn.Module, LoraLayer):
    owns_inner_layers = True

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, **kwargs: Any) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("lora.MultiheadAttention needs query, key and value of the same size (_qkv_same_embed_dim)")
        for option, shown in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
            if kwargs.get(option):
                raise ValueError(f"lora.MultiheadAttention does not support {shown}")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention")
        super().__init__()
        embed = base_layer.embed_dim
        self._init_lora(base_layer, embed, 3 * embed)
        base_layer.out_proj = Linear(base_layer.out_proj, adapter_name, **kwargs)
        self.update_layer(adapter_name, **kwargs, _with_out_proj=False)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "base_layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.get_base_layer(), name)  # embed_dim, num_heads, batch_first, in_proj_bias, ...

    @property
    def _out(self) -> Linear:
        return self.get_base_layer().out_proj

    # --- adapters, on both projections ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, *args: Any, _with_out_proj: bool = True, **kwargs: Any) -> None:
        kwargs.pop("fan_in_fan_out", None)
        super().update_layer(adapter_name, *args, **kwargs)
        if _with_out_proj:
            self._out.update_layer(adapter_name, *args, **kwargs)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        self._out.set_adapter(adapter_names, inference_mode)

    def set_requires_grad(self, adapter_names: Any, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._out.set_requires_grad(adapter_names, requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._out.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._out.delete_adapter(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    # --- the packed input projection is the weight this layer merges into ------------------------------------------
    def _base_weight_ref(self) -> torch.Tensor | None:
        return self.get_base_layer().in_proj_weight

    def _stored_weight(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight.data

    def _store_weight(self, weight: torch.Tensor) -> None:
        param = self.get_base_layer().in_proj_weight
        param.data = weight.to(param.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        todo = [n for n in (self.active_adapters if adapter_names is None else adapter_names) if n not in self.merged_adapters]
        super().merge(safe_merge, adapter_names)
        self._out.merge(safe_merge, [n for n in todo if n in self._out.lora_A])

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self._out.unmerge()

    def unwrapped_base(self) -> nn.Module:
        base = self.get_base_layer()
        base.out_proj = self._out.get_base_layer()
        return base

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_forward_args(query)
        if self._batch_adapter_names is not None:
            raise ValueError("lora.MultiheadAttention does not support per-sample adapter_names")
        active = [n for n in self.active_adapters if n in self.lora_A]
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or not active:
            return base(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        in_w, out = base.in_proj_weight, self._out
        out_w = out.get_base_layer().weight
        in_w = in_w + sum(self.get_delta_weight(n) for n in active).to(in_w.dtype)
        out_deltas = [out.get_delta_weight(n) for n in active if n in out.lora_A]
        if out_deltas:
            out_w = out_w + sum(out_deltas).to(out_w.dtype)
        # torch's module path, with W + delta passed for both weights (the arguments, not the module's attributes,
        # so that it also holds where FSDP swaps the attributes for views of its flat parameters).
        batched = query.dim() == 3
        if base.batch_first and batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query, key, value, base.embed_dim, base.num_heads, in_w, base.in_proj_bias, base.bias_k, base.bias_v,
            base.add_zero_attn, base.dropout, out_w, out.get_base_layer().bias, training=base.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        return (output.transpose(1, 0) if base.batch_first and batched else output), weights

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
