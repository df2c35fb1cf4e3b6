"""Offline merge of `target_parameters` adapters into checkpoints that store MoE experts one Linear weight each.

transformers (5 and later) fuses a MoE layer's experts into 3-D parameters when it loads a checkpoint (Qwen3-MoE's
`mlp.experts.{e}.gate_proj.weight` and `up_proj.weight` become rows of `mlp.experts.gate_up_proj[e]`,
`down_proj.weight` becomes `down_proj[e]`; Mixtral's `w1` / `w3` / `w2` the same), and a LoRA adapter made with
`target_parameters` adapts those fused parameters. The checkpoint on disk still has one weight per expert.

Expert e's delta is `scaling * B_e @ A_e`, with A_e rows e*r..(e+1)*r of lora_A and B_e the columns e, e+E, ... of
lora_B, so the adapter is exactly a plain LoRA adapter on the per-expert weights (B_e's rows split between gate and
up where those are fused). This module writes that adapter into a scratch folder; the Rust merge then applies it
as it applies any LoRA adapter (fp32, one rounding, exact-unmerge sidecar). The same conversion runs again on
unmerge, so the sidecar's manifest records the user's adapter files.
"""

from __future__ import annotations

import json
from pathlib import Path

# Fused expert parameter -> the per-expert weights it is made of, in the order their rows are concatenated, one
# tuple per checkpoint naming family.
_FUSED = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# Order in which MoE expert modules register their parameters: a nest of ParamWrappers has the later one outside.
_REGISTRATION_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_PREFIX = "base_model.model."


def needs_conversion(config: dict) -> bool:
    return config.get("peft_type") == "LORA" and bool(config.get("target_parameters"))


def convert(config: dict, weights: Path, base: Path, tensors_of_base: dict, out: Path) -> Path:
    """Write the per-expert LoRA adapter equivalent to the `target_parameters` adapter (`config`, `weights`) for
    the checkpoint `base` (whose tensors are `tensors_of_base`: name -> (shape, shard)) into the new folder `out`;
    returns its weights file. Anything that does not fit is a ValueError naming the tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise ValueError(
                f"{weights.parent}: an adapter with target_parameters and {field} cannot be merged offline yet; "
                "use merge_and_unload()"
            )
    r = int(config["r"])
    entries = sorted(config["target_parameters"])
    shapes = {name: shape for name, (shape, _) in tensors_of_base.items()}
    tensors = load_file(str(weights))
    converted: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        path = key[len(_PREFIX) : -len(".lora_A.weight")]
        parts = path.split(".")
        depth = parts.count("base_layer")
        module = ".".join(p for p in parts if p != "base_layer")
        param = _parameter_of(module, depth, entries, key)
        a = tensors[key].float()
        b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")].float()
        if a.shape[0] % r:
            raise ValueError(f"tensor '{key}' has {a.shape[0]} rows, not a multiple of r={r}")
        experts = a.shape[0] // r
        if f"{module}.{param}" in shapes:
            raise ValueError(
                f"'{module}.{param}' is stored fused in {base}: the offline merge handles checkpoints with one weight "
                "per expert; use merge_and_unload() for this one"
            )
        names = _expert_weights(module, param, experts, shapes, key)
        rows = [shapes[f"{module}.0.{n}.weight"][0] for n in names]
        if sum(rows) != b.shape[0] or shapes[f"{module}.0.{names[0]}.weight"][1] != a.shape[1]:
            raise ValueError(
                f"tensor '{key}': the adapter's {b.shape[0]} x {a.shape[1]} expert deltas do not fit the checkpoint's "
                f"{' + '.join(map(str, rows))} x {shapes[f'{module}.0.{names[0]}.weight'][1]} weights of '{module}'"
            )
        b = b.reshape(b.shape[0], r, experts)
        for e in range(experts):
            start = 0
            for name, n in zip(names, rows):
                target = f"{module}.{e}.{name}"
                # A_e is shared by gate and up; each key gets its own copy (a file holds no shared storage).
                converted[f"{_PREFIX}{target}.lora_A.weight"] = a[e * r : (e + 1) * r].clone()
                converted[f"{_PREFIX}{target}.lora_B.weight"] = b[start : start + n, :, e].contiguous()
                modules.add(target)
                start += n
    if not converted:
        raise ValueError(f"{weights}: no LoRA tensors for target_parameters")
    out.mkdir()
    new_config = {k: v for k, v in config.items() if k not in ("target_parameters",)}
    new_config["target_modules"] = sorted(modules)
    (out / "adapter_config.json").write_text(json.dumps(new_config))
    result = out / "adapter_model.safetensors"
    save_file(converted, str(result), metadata={"format": "pt"})
    return result


def _parameter_of(module: str, depth: int, entries: list[str], key: str) -> str:
    """The parameter that the ParamWrapper `depth` levels deep on `module` adapts: the module's targeted
    parameters nest in registration order, the last registered outside."""
    targeted = []
    for entry in entries:
        owner, _, name = entry.rpartition(".")
        if (not owner or module == owner or module.endswith("." + owner)) and name not in targeted:
            targeted.append(name)
    unknown = [n for n in targeted if n not in _REGISTRATION_ORDER]
    if unknown:
        raise ValueError(
            f"tensor '{key}': the offline merge knows how MoE expert parameters are stored, not {unknown}; use "
            "merge_and_unload()"
        )
    targeted.sort(key=_REGISTRATION_ORDER.index)
    if depth >= len(targeted):
        raise ValueError(f"tensor '{key}' is nested deeper than the adapter's target_parameters allow")
    return targeted[len(targeted) - 1 - depth]


def _expert_weights(module: str, param: str, experts: int, shapes: dict, key: str) -> tuple[str, ...]:
    """The per-expert weight names whose rows make up `param`, as this checkpoint names them."""
    for family in _FUSED.get(param, ()):
        if all(f"{module}.{e}.{n}.weight" in shapes for e in range(experts) for n in family):
            return family
    raise ValueError(
        f"tensor '{key}': the checkpoint has no per-expert weights for '{module}.{param}' "
        f"(looked for {', '.join(f'{module}.<e>.{n}.weight' for fam in _FUSED.get(param, ()) for n in fam)})"
    )
