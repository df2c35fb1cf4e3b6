"""LoRA adapters saved for transformers 4's per-expert MoE layers, loaded into transformers 5's fused experts.

transformers 4 gave each expert its own Linear layers (Mixtral: `block_sparse_moe.experts.<e>.w1` / `w3` / `w2`;
Qwen2-MoE and the models built like it: `mlp.experts.<e>.gate_proj` / `up_proj` / `down_proj`); transformers 5 keeps
them as two stacks, `experts.gate_up_proj` (E, 2I, H: every expert's gate and up projections, concatenated) and
`experts.down_proj` (E, H, I). An adapter of the first kind becomes LoRA on those stacks (`target_parameters`), as
PEFT converts it:

- down_proj: expert e's pair as it is;
- gate_up_proj: expert e's pairs joined: A = [A_gate; A_up] (rank 2r) and B = diag(B_gate, B_up) (block-diagonal), so
  B @ A = [B_gate @ A_gate; B_up @ A_up], the two deltas stacked as the weights are. The alpha doubles with the rank
  (by sqrt(2) with rsLoRA), so the scaling stays.

The result is laid out as PEFT lays LoRA on a parameter stack out (lora_A (E * r, in); lora_B (out, r * E), column
k * E + e holding expert e's k-th column), under the keys of a model holding just this adapter.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
from torch import nn

_PREFIX = "base_model.model."
_PER_EXPERT = re.compile(
    r"^(?P<block>.+)\.(?P<moe>block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.(?P<factor>lora_A|lora_B)\.weight$"
)
# The per-expert layer -> (stack, position in it).
_STACKS = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "gate_proj": ("gate_up_proj", 0),
           "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}  # fmt: skip


def fuse_per_expert_adapter(
    model: nn.Module, config: Any, weights: dict[str, torch.Tensor]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, tensors) of a LoRA adapter with per-expert factors, converted for `model`'s fused expert stacks;
    the inputs unchanged when there is nothing to convert (another method, no such keys, per-expert layers)."""
    if str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1] != "LORA" or getattr(config, "use_dora", False):
        return config, weights
    found: dict[str, dict[str, dict[int, dict[str, torch.Tensor]]]] = {}  # experts module -> layer -> expert -> factors
    for key, value in weights.items():
        m = _PER_EXPERT.match(key[len(_PREFIX) :]) if key.startswith(_PREFIX) else None
        if m is not None:
            module = f"{m['block']}.{m['moe']}.experts"
            found.setdefault(module, {}).setdefault(m["proj"], {}).setdefault(int(m["expert"]), {})[m["factor"]] = value
    if not found:
        return config, weights
    modules = dict(model.named_modules())
    converted = {k: v for k, v in weights.items() if not (k.startswith(_PREFIX) and _PER_EXPERT.match(k[len(_PREFIX) :]))}
    config = copy.copy(config)
    config.rank_pattern, config.alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    stacks_used: set[str] = set()
    for module, layers in found.items():
        target = module if module in modules else module.replace(".block_sparse_moe.", ".mlp.")
        fused = modules.get(target)
        stacks = {name: getattr(fused, name, None) for name in ("gate_up_proj", "down_proj")}
        if fused is None or not all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in stacks.values()):
            return config, weights  # the model has per-expert layers: the keys fit as they are
        by_stack: dict[str, list[str]] = {}
        for layer in layers:
            by_stack.setdefault(_STACKS[layer][0], []).append(layer)
        for stack, names in by_stack.items():
            names.sort(key=lambda n: _STACKS[n][1])
            if stack == "gate_up_proj" and len(names) != 2:
                raise ValueError(
                    f"the adapter adapts {names} of '{module}' but not both halves of the fused gate_up_proj; such an "
                    "adapter cannot be converted for this model's fused experts"
                )
            num_experts = stacks[stack].shape[0]
            a, b = _stack_pairs(layers, names, num_experts, module)
            nested = stack == "gate_up_proj" and "down_proj" in by_stack
            where = f"{_PREFIX}{target}{'.base_layer' if nested else ''}"
            converted[f"{where}.lora_A.weight"] = a
            converted[f"{where}.lora_B.weight"] = b
            stacks_used.add(stack)
            if len(names) > 1:
                rank, alpha = a.shape[0] // num_experts, _alpha_for(config, names[0])
                pattern = rf".*\.experts\.{stack}"
                config.rank_pattern[pattern] = rank
                config.alpha_pattern[pattern] = alpha * (math.sqrt(len(names)) if config.use_rslora else len(names))
    per_expert = {p for layers in found.values() for p in layers}
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        still = [t for t in targets if t not in per_expert or any(n.endswith("." + t) for n in modules)]
        config.target_modules = still
    config.target_parameters = sorted(set(config.target_parameters or []) | {f"experts.{s}" for s in stacks_used})
    return config, converted


def _alpha_for(config: Any, layer: str) -> float:
    for pattern, alpha in (config.alpha_pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", layer):
            return alpha
    return config.lora_alpha


def _stack_pairs(
    layers: dict[str, dict[int, dict[str, torch.Tensor]]], names: list[str], num_experts: int, module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (E * r, in) and lora_B (out, r * E) of one stack, from the per-expert pairs of `names` (joined)."""
    a_stack, b_stack = [], []
    for e in range(num_experts):
        pairs = [layers[n].get(e, {}) for n in names]
        if any(set(p) != {"lora_A", "lora_B"} for p in pairs):
            raise ValueError(f"the adapter lacks lora_A / lora_B of expert {e} of '{module}' ({', '.join(names)})")
        a_stack.append(torch.cat([p["lora_A"] for p in pairs], dim=0))
        b_stack.append(torch.block_diag(*(p["lora_B"] for p in pairs)))
    a = torch.stack(a_stack)  # (E, r', in)
    b = torch.stack(b_stack)  # (E, out, r')
    return a.reshape(-1, a.shape[-1]).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()
