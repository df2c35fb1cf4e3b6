"""Adapter state dicts in HF PEFT's naming, and the adapter weight files.

On disk the adapter name is removed from every key (`...lora_A.default.weight` -> `...lora_A.weight`) and
`modules_to_save` copies are stored under the original module's key; both directions are computed from the
model's structure, so saving and loading are exact inverses.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn

from oxpeft._io import atomic_path
from oxpeft.hub import resolve_file
from oxpeft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, matches_targets
from oxpeft.utils.constants import EMBEDDING_LAYER_NAMES, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from oxpeft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

# What `nn.Module.load_state_dict` returns (a named tuple of missing_keys, unexpected_keys), as PEFT returns it.
IncompatibleKeys = nn.modules.module._IncompatibleKeys

# The one tensor of a prompt-learning adapter: its encoder's output for every virtual token.
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """`a.lora_A.default.weight` -> `a.lora_A.weight`; `a.lora_embedding_A.default` -> `a.lora_embedding_A`."""
    if key.endswith("." + adapter_name):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    if head.endswith("." + adapter_name):
        head = head[: -len(adapter_name) - 1]
    return f"{head}.{suffix}"


# Wrappers that insert a submodule into the module tree but not into the state dict: FSDP (with
# use_orig_params) and activation checkpointing.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def state_dict_module_name(name: str) -> str:
    """A module's name as its state-dict keys spell it: wrapper segments removed."""
    if not any(segment in name for segment in _WRAPPER_SEGMENTS):
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def named_modules_for_state_dict(model: nn.Module):
    """`model.named_modules()` with each name as the state dict spells it (see `state_dict_module_name`)."""
    for name, module in model.named_modules():
        yield state_dict_module_name(name), module


def adapter_key_map(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """Model state-dict key -> checkpoint key, for every tensor that belongs to `adapter_name`."""
    mapping: dict[str, str] = {}
    modules = dict(named_modules_for_state_dict(model))
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        if isinstance(module, BaseTunerLayer) and not module.saves_tensors:
            continue
        if isinstance(module, BaseTunerLayer):
            # In a mixed model a layer may sit inside another method's layer (`lin0.base_layer`); its file keys
            # are those of the module it adapts (`lin0.lora_A...`), as a plain model writes them.
            ckpt_prefix = prefix
            if module.file_keys_keep_nesting:
                ckpt_prefix = _nesting_of(modules, name, adapter_name)
            while ckpt_prefix.endswith(".base_layer.") and not module.file_keys_keep_nesting:
                ckpt_prefix = ckpt_prefix[: -len("base_layer.")]
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                inner = prefix + module.file_key_infix  # the containers may sit in a child (`token_adapter.`)
                if isinstance(item, torch.Tensor):
                    keys = [f"{inner}{attr}.{adapter_name}"]
                else:
                    keys = [f"{inner}{attr}.{adapter_name}.{k}" for k in item.state_dict()]
                for key in keys:
                    ckpt = ckpt_prefix + remove_adapter_name(key, adapter_name)[len(prefix) :]
                    if attr == "lora_magnitude_vector" and ckpt.endswith(".weight"):
                        ckpt = ckpt[: -len(".weight")]  # PEFT keeps DoRA's pre-ModuleDict key
                    mapping[key] = ckpt
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k in module.modules_to_save[adapter_name].state_dict():
                mapping[f"{prefix}modules_to_save.{adapter_name}.{k}"] = f"{prefix}{k}"
    return mapping


def _nesting_of(modules: dict[str, nn.Module], name: str, adapter_name: str) -> str:
    """The key prefix of the nested layer `name` (a ParamWrapper, `x.base_layer.base_layer`) for one adapter: a
    `base_layer` step for each wrapper around it that holds the adapter too. That is the nesting PEFT builds when it
    loads this adapter alone, so a file of one of several adapters on different parameters loads there."""
    outer, steps = name, 0
    while outer.endswith(".base_layer"):
        outer = outer[: -len(".base_layer")]
        wrapper = modules.get(outer)
        if isinstance(wrapper, BaseTunerLayer) and adapter_name in wrapper.adapter_names():
            steps += 1
    return outer + ".base_layer" * steps + "."


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict(keep_vars=True)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as in PEFT's adapter_model.safetensors."""
    config = model.peft_config[adapter_name]
    tensors = state_dict if state_dict is not None else _model_tensors(model)
    key_map = adapter_key_map(model, adapter_name)
    selected = {model_key: tensors[model_key] for model_key in key_map}
    tuner = _tuner_of(model)
    if tuner is not None:
        selected = tuner.adapter_tensors_to_save(model, selected, adapter_name)
    out: dict[str, torch.Tensor] = {ckpt_key: selected[model_key] for model_key, ckpt_key in key_map.items()}
    if config.is_prompt_learning:
        out[PROMPT_EMBEDDINGS_KEY] = model.get_prompt_embedding_to_save(adapter_name)

    bias = getattr(config, "bias", "none")
    if bias == "all":
        out.update({k: v for k, v in tensors.items() if k.endswith(".bias") and k not in out and "lora_" not in k})
    elif bias.endswith("_only"):
        for name, module in named_modules_for_state_dict(model):
            if isinstance(module, BaseTunerLayer) and adapter_name in module.adapter_names():
                key = f"{name}.base_layer.bias"
                if key in tensors:
                    out[key] = tensors[key]

    if _save_embeddings(model, config, save_embedding_layers):
        # The input and the output embedding, where an adapter wraps them (a tied output layer too), as PEFT does.
        layers = [getattr(model, f"get_{kind}_embeddings", lambda: None)() for kind in ("input", "output")]
        for name, module in named_modules_for_state_dict(model):
            if any(module is layer for layer in layers) and isinstance(module, BaseTunerLayer):
                key = f"{name}.base_layer.weight"
                out[key] = tensors[key]
    return {k: v.detach() for k, v in out.items()}


def _tuner_of(model: nn.Module) -> BaseTuner | None:
    """The tuner inside a PeftModel, or `model` itself when it is a tuner."""
    if isinstance(model, BaseTuner):
        return model
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, BaseTuner) else None


def _save_embeddings(model: nn.Module, config: Any, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    if isinstance(targets, str):
        targeted = any(
            matches_targets(targets, name) and re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", name)
            for name, _ in model.named_modules()
        )
    else:
        targeted = any(name in targets for name in EMBEDDING_LAYER_NAMES)
    if targeted:
        warnings.warn("Saving the embedding layer's weights with the adapter because it is targeted", stacklevel=3)
    return targeted


# `.base_layer` segments in front of a tuner layer's adapter attribute (lora_A, hada_w1_a, lokr_w1, ...).
_NESTED_LAYER = re.compile(r"(?:\.base_layer)+(?=\.(?:lora_|hada_|lokr_|ia3_)[^.]*(?:\.|$))")


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Copy checkpoint tensors into adapter `adapter_name`. Every key and shape is checked before anything is
    written, so on error the model is unchanged.

    Returns `load_state_dict`'s result as PEFT does: `missing_keys` are the model's tensors the file does not
    set (the base model, other adapters), `unexpected_keys` is empty (a tensor that fits no module is an error).
    With `ignore_mismatched_sizes`, tensors whose shape differs from the model's are skipped with a warning
    instead of refused. The tensors are copied into the existing adapter weights, in place; adapter weights on the
    meta device (created with `low_cpu_mem_usage=True`) are replaced by the file's tensors instead.
    """
    key_map = adapter_key_map(model, adapter_name)
    by_ckpt = {ckpt: mk for mk, ckpt in key_map.items()}
    tensors = _model_tensors(model)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    unexpected: list[str] = []
    problems: list[str] = []
    skipped: list[str] = []
    loaded: set[str] = set()
    prompt_value: torch.Tensor | None = None
    if model.peft_config[adapter_name].is_prompt_learning:
        peft_model_state_dict = dict(peft_model_state_dict)
        prompt_value = peft_model_state_dict.pop(PROMPT_EMBEDDINGS_KEY, None)
        problems += _prompt_problems(model, adapter_name, prompt_value)
    for ckpt_key, value in peft_model_state_dict.items():
        model_key = by_ckpt.get(ckpt_key, ckpt_key if ckpt_key in tensors else None)
        if model_key is None:  # PEFT's key for a layer nested in a mixed model: `lin0.base_layer.lora_A...`
            model_key = by_ckpt.get(_NESTED_LAYER.sub("", ckpt_key))
        if model_key is None:
            unexpected.append(ckpt_key)
            continue
        target = tensors[model_key]
        if tuple(value.shape) != tuple(target.shape):
            message = f"tensor '{ckpt_key}' has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}"
            if ignore_mismatched_sizes:
                skipped.append(message)
            else:
                problems.append(message)
            continue
        if value.dtype.is_floating_point != target.dtype.is_floating_point:
            problems.append(f"tensor '{ckpt_key}' has dtype {value.dtype}, the model's is {target.dtype}")
            continue
        plan.append((model_key, target, value))
        loaded.add(model_key)
    missing = sorted(set(by_ckpt) - {_NESTED_LAYER.sub("", k) for k in peft_model_state_dict} - set(peft_model_state_dict))
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) missing from the file, e.g. {_first(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in the file match no module of this model, e.g. {_first(unexpected)} "
            "(is the adapter for another model or another method?)"
        )
    if problems:
        raise ValueError(f"adapter '{adapter_name}' does not fit this model: " + "; ".join(problems))
    if _is_fsdp_wrapped(model):
        # FSDP's state dict holds gathered copies, not the parameters; its load_state_dict hooks write the
        # values into the (possibly sharded) parameters. Every key and shape was checked above.
        model.load_state_dict({key: value.to(dtype=target.dtype) for key, target, value in plan}, strict=False)
    else:
        with torch.no_grad():
            for model_key, target, value in plan:
                if target.device.type == "meta":
                    _assign(model, model_key, target, value)
                else:
                    target.copy_(value.to(device=target.device, dtype=target.dtype))
    if prompt_value is not None:
        model.prompt_encoder[adapter_name].load_output(prompt_value)
    if skipped:
        warnings.warn(
            f"adapter '{adapter_name}': {len(skipped)} tensor(s) left as initialised because ignore_mismatched_sizes=True: "
            + "; ".join(skipped),
            stacklevel=2,
        )
    return IncompatibleKeys(missing_keys=[k for k in tensors if k not in loaded], unexpected_keys=[])


def _is_fsdp_wrapped(model: nn.Module) -> bool:
    return any(name.endswith("_fsdp_wrapped_module") for name, _ in model.named_modules())


def _assign(model: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor) -> None:
    """Put `value` in place of the meta tensor `target` (an adapter created with low_cpu_mem_usage=True), in the
    target's dtype, on the value's device, keeping whether it trains."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    data = value.detach().to(dtype=target.dtype).clone()
    if isinstance(target, nn.Parameter):
        setattr(owner, attr, nn.Parameter(data, requires_grad=target.requires_grad))
    else:
        setattr(owner, attr, data)


def _prompt_problems(model: nn.Module, adapter_name: str, value: torch.Tensor | None) -> list[str]:
    """What keeps `value` (a file's prompt_embeddings) from loading into the adapter's prompt encoder."""
    if value is None:
        return [f"tensor '{PROMPT_EMBEDDINGS_KEY}' is missing from the file"]
    encoder = model.prompt_encoder[adapter_name]
    if encoder.reparametrised:
        return [
            f"tensor '{PROMPT_EMBEDDINGS_KEY}' is the {type(encoder).__name__}'s output, not its reparametrisation "
            "weights, so it cannot be trained further through the encoder; load it with is_trainable=False"
        ]
    expected = tuple(encoder.embedding.weight.shape)
    if tuple(value.shape) != expected:
        return [
            f"tensor '{PROMPT_EMBEDDINGS_KEY}' has shape {tuple(value.shape)} but the config gives {expected} "
            "(num_virtual_tokens x width)"
        ]
    if not value.dtype.is_floating_point:
        return [f"tensor '{PROMPT_EMBEDDINGS_KEY}' has dtype {value.dtype}; expected a floating-point tensor"]
    return []


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> dict[str, torch.Tensor]:
    """Read adapter weights: adapter_model.safetensors, else adapter_model.bin (weights_only, never unpickled)."""
    device = device or "cpu"
    path = resolve_file(
        model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, revision=revision, token=token, required=False
    )
    if path is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    path = resolve_file(model_id, WEIGHTS_NAME, subfolder=subfolder, revision=revision, token=token, required=False)
    if path is None:
        where = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {where}")
    return load_pickled_tensors(path, device)


def load_pickled_tensors(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """A legacy `adapter_model.bin`: a dict of tensors read with `torch.load(weights_only=True)`, which never runs
    pickled code. Anything else is one ValueError naming the file (not torch's traceback and its advice to turn
    the safety off)."""
    try:
        weights = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        if "Weights only load failed" in text:
            reason = "it holds pickled objects other than tensors"
        else:
            reason = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:160]
        raise ValueError(
            f"{os.fspath(path)}: not a plain tensor file ({reason}); oxpeft reads .bin adapters without running "
            "pickled code. Convert a file you trust to adapter_model.safetensors"
        ) from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{os.fspath(path)}: expected a dict of tensors")
    return weights


def save_peft_weights(
    tensors: dict[str, torch.Tensor], directory: str | os.PathLike, safe_serialization: bool = True
) -> str:
    """Write adapter weights atomically; returns the file's path."""
    # Clone so that tensors sharing storage (tied weights) serialise independently, and move to CPU.
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        with atomic_path(path) as tmp:
            save_file(data, tmp, metadata={"format": "pt"})
    else:
        path = os.path.join(directory, WEIGHTS_NAME)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    return path


# --------------------------------------------------------------------------------------------------------------
# The base model's own state dict, under the original model's keys
# --------------------------------------------------------------------------------------------------------------
def _original_key(root: nn.Module, key: str) -> str | None:
    """The original (pre-adapter) model's key of state-dict key `key` of the adapted model `root`, or None for an
    adapter's tensor. The module path is walked, so only real wrapper levels (`base_layer` of an adapter layer,
    `original_module` of a modules_to_save wrapper) are dropped, whatever the model's own module names are."""
    parts = key.split(".")
    kept: list[str] = []
    current: nn.Module | None = root
    for i, part in enumerate(parts):
        if current is None:
            kept.extend(parts[i:])
            break
        if isinstance(current, BaseTunerLayer):
            if part != "base_layer":
                return None  # lora_A, lora_magnitude_vector, ia3_l, ...
            current = current.base_layer
            continue
        if isinstance(current, AuxiliaryTrainingWrapper):
            if part != "original_module":
                return None  # the per-adapter copies
            current = current.original_module
            continue
        kept.append(part)
        child = current._modules.get(part)
        current = child
    return ".".join(kept)


def _base_key_map(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """(the module holding the base model, {original key: adapted key}) of a PeftModel."""
    if getattr(model, "_is_prompt_learning", False):
        base = model.base_model
        return base, {k: k for k in base.state_dict()}
    root = model.base_model.model if isinstance(model.base_model, BaseTuner) else model
    mapping = {}
    for key in root.state_dict():
        original = _original_key(root, key)
        if original is not None:
            mapping[original] = key
    return root, mapping


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors of a PeftModel under the original model's keys (no `base_layer` /
    `original_module` infixes, no adapter tensors): what the model's own `load_state_dict` takes."""
    root, mapping = _base_key_map(model)
    state = root.state_dict()
    return {original: state[adapted] for original, adapted in mapping.items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> IncompatibleKeys:
    """Load a state dict keyed by the original model's keys into a PeftModel's base model (the inverse of
    `get_base_model_state_dict`); adapters are left as they are. With `strict`, a missing or unexpected key is a
    RuntimeError naming them, and nothing is loaded."""
    root, mapping = _base_key_map(model)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            problems.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(problems))
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def rename_keys(
    weights: dict[str, torch.Tensor], key_mapping: dict[str, str] | None, model: nn.Module, config: Any
) -> dict[str, torch.Tensor]:
    """An adapter file's tensors with their keys renamed by `key_mapping` ({regex: replacement}, the first
    pattern that matches a key wins), as transformers renames checkpoint keys of models whose layout changed.
    Without a mapping, the model's own `_checkpoint_conversion_mapping` is used (not for prompt learning, whose
    one tensor has a fixed key). PEFT's `base_model.model.` prefix is kept out of the renaming."""
    if key_mapping is None:
        key_mapping = {} if config.is_prompt_learning else dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    if not key_mapping:
        return weights
    prefix = "base_model.model."
    renamed: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        head, body = (prefix, key[len(prefix):]) if key.startswith(prefix) else ("", key)
        for pattern, replacement in key_mapping.items():
            body, count = re.subn(pattern, replacement, body)
            if count:
                break
        renamed[head + body] = value
    return renamed


def check_ranks_against_file(config: Any, weights: dict[str, torch.Tensor], source: str) -> None:
    """Before any adapter weight is allocated: a LoRA config's rank for each module (`r`, `rank_pattern`) must be
    the rank of that module's tensors in the file. A config edited to `r=10**12` is then one error naming the
    module, not an allocation of terabytes (or of 0.75 GB for r=20000 before the shapes are compared)."""
    from oxpeft.tuners.tuners_utils import pattern_key

    from oxpeft.utils.peft_types import PeftType

    if getattr(config, "peft_type", None) != PeftType.LORA:
        return
    for key, tensor in weights.items():
        for marker in (".lora_A.weight", ".lora_embedding_A"):
            if not key.endswith(marker) or tensor.dim() == 0:
                continue
            module = key[: -len(marker)].removeprefix("base_model.model.")
            pattern = pattern_key(config.rank_pattern or {}, module)
            expected = config.rank_pattern[pattern] if pattern is not None else config.r
            # target_parameters: an expert stack's lora_A has r rows per expert, and the expert count is the
            # model's, so only a multiple of the rank can be checked here (enough to refuse a huge r).
            per_expert = bool(getattr(config, "target_parameters", None)) and tensor.shape[0] % expected == 0
            if expected != tensor.shape[0] and not per_expert:
                raise ValueError(
                    f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, rank {tensor.shape[0]}, but the config "
                    f"gives '{module}' rank {expected}; the config and the weights do not belong together"
                )
