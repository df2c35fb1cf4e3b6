"""Machinery shared by every injection-based method (LoRA, IA3, LoHa, LoKr, AdaLoRA).

- `BaseTunerLayer`: the mixin of a layer that wraps a base layer and holds per-adapter parameters.
- `DeltaTunerLayer`: a `BaseTunerLayer` whose adapters add a weight delta (AdaLoRA, LoHa, LoKr): shared forward,
  merge and unmerge.
- `ModulesToSaveWrapper`: a trainable per-adapter copy of a whole module (`modules_to_save`).
- `BaseTuner`: the nn.Module that wraps a model, finds the target modules, injects layers and
  implements adapter management, merge and unload.
- target matching (`target_modules`, `exclude_modules`, `layers_to_transform`, `"all-linear"`), with
  errors for every list entry that matches nothing.
"""

from __future__ import annotations

import abc
import copy
import difflib
import functools
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from oxpeft import _native
from oxpeft._io import check_adapter_name
from oxpeft.config import PeftConfig
from oxpeft.quant.bnb import bnb_bits, dequantize_bnb, requantize_bnb
from oxpeft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from oxpeft.utils.error import NoMatchingPeftModuleError
from oxpeft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, _get_submodules
from oxpeft.utils.peft_types import TaskType
from oxpeft.utils.warning import PeftWarning


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or a quantised Linear (anything with in/out_features and dequantize())."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantize"))


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------
# While set (BaseTuner.inject_adapter(low_cpu_mem_usage=True)), new adapter weights go to the meta device:
# nothing is initialised, and loading a state dict then assigns the file's tensors (set_peft_model_state_dict).
_ADAPTERS_ON_META: ContextVar[bool] = ContextVar("oxpeft_adapters_on_meta", default=False)

# Initialisations that read or change the base weight, which meta adapter weights cannot take part in.
_BASE_READING_INITS = ("pissa", "olora", "loftq")


def _meta_injection_possible(config: PeftConfig) -> bool:
    init = getattr(config, "init_lora_weights", True)
    return not (isinstance(init, str) and init.startswith(_BASE_READING_INITS))


class BaseTunerLayer:
    """Mixin for a layer that wraps `base_layer` and holds per-adapter parameters.

    Subclasses name their per-adapter containers in `adapter_layer_names` (ModuleDict / ParameterDict keyed by
    adapter name) and their per-adapter plain values in `other_param_names` (dicts keyed by adapter name).
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: ClassVar[tuple[str, ...]] = ()
    # Whether a layer nested in another (`x.base_layer`) saves its tensors under that nested name. A mixed model's
    # layers save as the module they adapt (`x.lora_A...`); nested ParamWrappers keep the nesting, as PEFT's do.
    file_keys_keep_nesting: ClassVar[bool] = False
    # Inserted between a layer's name and its tensors' names in a file (`token_adapter.` for LoRA's trainable
    # tokens, as PEFT's wrapper nests them), and whether the layer's tensors are saved at all (not for a layer
    # that only follows another's, where PEFT does not save them).
    file_key_infix: str = ""
    saves_tensors: bool = True
    # Whether merging keeps a tied output layer tied (the layer writes the same rows through both).
    keeps_tying: ClassVar[bool] = False
    # Whether the layers inside this layer's base belong to it (LoRA on MultiheadAttention owns its out_proj layer):
    # the tuner's loops then leave them to this layer.
    owns_inner_layers: ClassVar[bool] = False

    # Adapter weights that a variant keeps frozen, per adapter (PEFT's attribute and format): MiCA's lora_B. Never
    # mutated in place: `freeze_adapter_weight` replaces the dict, so the class default stays empty.
    frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}

    def unwrapped_base(self) -> nn.Module:
        """What replaces this layer when it is unloaded."""
        return self.base_layer

    def freeze_adapter_weight(self, adapter_name: str, weight_name: str) -> None:
        """Keep `weight_name` (one of `adapter_layer_names`) of the adapter frozen, whatever makes it trainable."""
        names = dict(self.frozen_peft_weight_names)
        if weight_name not in names.get(adapter_name, ()):
            names[adapter_name] = names.get(adapter_name, ()) + (weight_name,)
        self.frozen_peft_weight_names = names
        self._freeze_non_trainable_peft_weights(adapter_name)

    def _freeze_non_trainable_peft_weights(self, adapter_names: str | Iterable[str] | None = None) -> None:
        """Freeze the adapter weights a variant declared frozen (after anything that made adapter weights trainable)."""
        if not self.frozen_peft_weight_names:
            return
        if adapter_names is None:
            adapter_names = list(self.frozen_peft_weight_names)
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name in adapter_names:
            for attr in self.frozen_peft_weight_names.get(name, ()):
                container = getattr(self, attr, None)
                if container is not None and name in container:
                    container[name].requires_grad_(False)

    base_layer: nn.Module
    _active_adapter: list[str]
    merged_adapters: list[str]
    _disable_adapters: bool

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._active_adapter = []
        self.merged_adapters = []
        self._disable_adapters = False

    # --- state ---------------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, BaseTunerLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `module.weight` (e.g. transformers' dtype checks) sees the base weight.
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    def _all_available_adapter_names(self) -> list[str]:
        """PEFT's name for `adapter_names`."""
        return self.adapter_names()

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for name in getattr(self, attr):
                if name not in names:
                    names.append(name)
        return names

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield item
            elif isinstance(item, torch.Tensor):
                continue  # a buffer (VeLoRA's projection vector): saved, not trained
            elif not item._modules:
                # A leaf such as lora_A's nn.Linear: its own parameters, without torch's recursive walk
                # (set_adapter visits every adapter of every layer).
                yield from (p for p in item._parameters.values() if p is not None)
            else:
                yield from item.parameters()

    def _base_weight_ref(self) -> torch.Tensor | None:
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None

    def _move_adapter_to_base(self, adapter_name: str, adapter_dtype: torch.dtype | None) -> None:
        """Put a new adapter's tensors on the base weight's device, in `adapter_dtype` (default: the base's)."""
        ref = self._base_weight_ref()
        device = ref.device if ref is not None and ref.device.type != "meta" else None
        if _ADAPTERS_ON_META.get():
            device = torch.device("meta")
        dtype = adapter_dtype
        if dtype is None and ref is not None and ref.dtype.is_floating_point:
            dtype = ref.dtype
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(item.data.to(device=device, dtype=dtype))
            elif isinstance(item, torch.Tensor):
                container[adapter_name] = item.to(device=device)
            else:
                item.to(device=device, dtype=dtype)

    # --- the base weight, for merging (quantised bases are dequantised / requantised) --------------------------
    def _stored_weight(self) -> torch.Tensor:
        """The base weight in its stored layout (transposed for fan_in_fan_out), dequantised for quantised bases."""
        base = self.get_base_layer()
        if bnb_bits(base):
            return dequantize_bnb(base)
        if hasattr(base, "dequantize"):
            weight = base.dequantize(base.original_dtype)
            return weight.T if getattr(self, "fan_in_fan_out", False) else weight
        return base.weight.data

    def _store_weight(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        bnb = bnb_bits(base)
        if bnb or hasattr(base, "dequantize"):
            warnings.warn(
                f"merging into the quantised {type(base).__name__} requantises its weight, which rounds the merged "
                "weight to the quantisation grid"
                + ("" if bnb else "; merge_and_unload() keeps a full-precision weight instead"),
                stacklevel=4,
            )
        if bnb:
            requantize_bnb(base, weight)
        elif hasattr(base, "dequantize"):
            dense = weight.T if getattr(self, "fan_in_fan_out", False) else weight
            # Requantising keeps the dtype recorded as the one the weight had before quantisation.
            base.set_weight(dense.to(base.original_dtype))
        else:
            base.weight.data = weight.to(base.weight.dtype)

    def dequantize_base(self) -> None:
        """Replace one of oxpeft's quantised base layers by an nn.Linear holding its dequantised weight, in the
        dtype the weight had before quantisation (so the layer fits the rest of the model)."""
        base = self.base_layer
        if not hasattr(base, "dequantize"):
            return
        dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
        weight = base.dequantize(base.original_dtype).detach()
        dense.to(device=weight.device, dtype=weight.dtype)
        dense.weight.data = weight
        if base.bias is not None:
            dense.bias.data = base.bias.detach().to(weight.dtype)
        dense.requires_grad_(False)
        self.base_layer = dense

    # --- switching -----------------------------------------------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active adapters of this layer, trainable unless `inference_mode`; the others
        are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = self.adapter_names()
        for name in present:
            trainable = name in names and not inference_mode
            for p in self.adapter_parameters(name):
                if p.requires_grad != trainable:
                    p.requires_grad_(trainable)
        self._freeze_non_trainable_peft_weights(names)
        # As PEFT, the names are kept even where this layer holds no such adapter (its forward skips them), so
        # every layer of a model reports the same active adapters.
        self._active_adapter = names

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights on or off, whether active or not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(requires_grad)
        if requires_grad:
            self._freeze_non_trainable_peft_weights(names)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    #: Whether the forward casts its input to the adapter weights' dtype (off inside
    #: `helpers.disable_input_dtype_casting`, for hooks that manage dtypes themselves, e.g. diffusers' layerwise casting).
    cast_input_dtype_enabled: bool = True

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name in self.frozen_peft_weight_names:
            # In place: holding the name, the dict is this layer's own (the class default is empty).
            del self.frozen_peft_weight_names[adapter_name]
        if adapter_name in self._active_adapter:
            self._active_adapter = [n for n in self._active_adapter if n != adapter_name]
            if not self._active_adapter:
                remaining = self.adapter_names()
                if remaining:
                    self.set_adapter(remaining[0])

    # --- merging -------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise TypeError(f"{type(self).__name__} cannot be merged into its base layer")

    def unmerge(self) -> None:
        raise TypeError(f"{type(self).__name__} cannot be unmerged")

    def _adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        todo = [n for n in names if n not in self.merged_adapters and n in self.adapter_names()]
        already = [n for n in names if n in self.merged_adapters]
        # PEFT's wording, which code and tests match on.
        if already and not todo:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
        elif already:
            warnings.warn(
                f"Already following adapters were merged {','.join(already)}. "
                f"You are now additionally merging {','.join(todo)}.",
                stacklevel=3,
            )
        return todo


def innermost_base(module: nn.Module) -> nn.Module:
    """The layer an adapter layer (or a stack of them, in a mixed model) adapts; `module` itself otherwise."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def check_merged_weight(weight: torch.Tensor, adapter_name: str) -> None:
    """`safe_merge`: refuse a merged weight with NaN or inf (nothing has been written yet)."""
    if not torch.isfinite(weight).all():
        raise ValueError(f"merging adapter '{adapter_name}' would produce NaN/inf weights; the model is unchanged")


class DeltaTunerLayer(nn.Module, BaseTunerLayer):
    """A layer whose adapters each add a weight delta `get_delta_weight(name)` (in the base weight's layout).

    It is an nn.Module itself so that its `forward` comes before `nn.Module.forward` in subclasses' MRO.

    Forward is ``base(x) + sum(adapter_output(name, x))`` over the active adapters; merging adds the delta computed
    in fp32 to the base weight and rounds once, unmerging subtracts it again.
    """

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _adapter_output(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """What adapter `adapter_name` adds to the base output for input `x` (None: nothing this time)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        result_dtype = result.dtype
        available = self.adapter_names()
        for name in self._active_adapter:
            if name not in available:
                continue
            out = self._adapter_output(name, x, *args, **kwargs)
            if out is not None:
                result = result + out
        return result.to(result_dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            merged = self._stored_weight().float() + self.get_delta_weight(name).detach().float()
            if safe_merge:
                check_merged_weight(merged, name)
            self._store_weight(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._store_weight(self._stored_weight().float() - self.get_delta_weight(name).detach().float())


# --------------------------------------------------------------------------------------------------------------
# Target matching
# --------------------------------------------------------------------------------------------------------------
def matches_list_entry(key: str, entry: str) -> bool:
    return key == entry or key.endswith("." + entry)


def dot_suffixes(key: str) -> list[str]:
    """`key` and every tail of it that starts after a '.': the names a list entry may equal to match `key`."""
    out = [key]
    i = key.find(".")
    while i != -1:
        out.append(key[i + 1 :])
        i = key.find(".", i + 1)
    return out


class ListMatcher:
    """PEFT's rule for a list of module names (an entry matches a name equal to it or ending in "." + it), in time
    linear in the list and the names: a 300,000-entry `target_modules` costs one set, not a scan per module."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = frozenset(entries)

    def matches(self, key: str) -> bool:
        return any(tail in self.entries for tail in dot_suffixes(key))

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The entries that match none of `names`, sorted."""
        covered = {tail for name in names for tail in dot_suffixes(name)}
        return sorted(e for e in self.entries if e not in covered)


@functools.lru_cache(maxsize=512)
def _compiled(anchored: str) -> Any:
    return _native.BoundedRegex(anchored)


# How many unmatched list entries an error names (the rest are counted).
_SHOWN_ENTRIES = 5


def _shown(value: str, limit: int = 80) -> str:
    """`value` for an error message: its repr, cut to `limit` characters (a 2 MB pattern is not echoed)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...' ({len(value):,} characters)"


def user_regex_match(pattern: str, key: str, *, whole: bool = True, field: str = "target_modules") -> bool:
    """Whether the user's `pattern` matches module name `key`: the whole name (`whole`, PEFT's `re.fullmatch`), or
    its end after a '.' (rank / alpha patterns). Matched by oxpeft's native engine in bounded time (no
    catastrophic backtracking); a pattern it cannot compile or that backtracks too much is a ValueError naming
    `field`."""
    anchored = f"^(?:{pattern})$" if whole else f"^(?:.*\\.)?(?:{pattern})$"
    try:
        return _compiled(anchored).is_match(key)
    except ValueError as exc:
        raise ValueError(f"{field}: the regex {_shown(pattern)} cannot be used: {exc}") from None


def matches_targets(targets: str | Iterable[str] | ListMatcher, key: str, field: str = "target_modules") -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches the name or its end."""
    if isinstance(targets, str):
        return user_regex_match(targets, key, field=field)
    if isinstance(targets, ListMatcher):
        return targets.matches(key)
    return any(matches_list_entry(key, t) for t in targets)


class TargetRule:
    """`check_target_module_exists` for one config, prepared once for many module names (lists become sets)."""

    def __init__(self, config: PeftConfig) -> None:
        def prepared(value: Any) -> Any:
            return value if value is None or isinstance(value, str) else ListMatcher(value)

        self.targets = prepared(getattr(config, "target_modules", None))
        self.exclude = prepared(getattr(config, "exclude_modules", None) or None)
        layers = getattr(config, "layers_to_transform", None)
        self.layers = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        self.layers_pattern = getattr(config, "layers_pattern", None)

    def matches(self, key: str) -> bool:
        if self.targets is None or not matches_targets(self.targets, key):
            return False
        if self.exclude is not None and matches_targets(self.exclude, key, field="exclude_modules"):
            return False
        if self.layers is not None:
            return layer_index(key, self.layers_pattern) in self.layers
        return True


def check_target_module_exists(config: PeftConfig, key: str) -> bool:
    """Whether the module named `key` is a target of `config`: it matches `target_modules` (a regex matching the
    whole name, or a list entry equal to the name or its end), is not excluded by `exclude_modules`, and lies in
    one of `layers_to_transform` (if given, with `layers_pattern`)."""
    return TargetRule(config).matches(key)


def _find_minimal_target_modules(target_modules: Iterable[str], other_module_names: Iterable[str]) -> set[str]:
    """The fewest name suffixes that match every name of `target_modules` and none of `other_module_names` (as
    HF PEFT computes it, to shorten a long explicit list of module names, e.g. from diffusers).

    Greedy: names are taken in the order of their suffix lists, and each adds its shortest suffix that no other
    module has, unless a suffix already kept covers it. With no such suffix the names are returned as they are.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError("target_modules should be a list or set of strings.")
    targets = set(target_modules)
    if "" in targets:
        raise ValueError("target_modules should not contain an empty string.")
    others = set(other_module_names)
    if not targets.isdisjoint(others):
        raise ValueError(f"target_modules and other_module_names share {sorted(targets & others)[:5]}")

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first

    taken_by_others = {suffix for name in others for suffix in suffixes(name)}
    kept: set[str] = set()
    for name, candidates in sorted(((n, suffixes(n)) for n in targets), key=lambda item: item[1]):
        if any(name.endswith("." + suffix) for suffix in kept):
            continue
        for suffix in candidates:
            if suffix not in kept and suffix not in taken_by_others:
                kept.add(suffix)
                break
    return kept or targets


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer number in `key`: the last number part that follows a part (or dotted run of parts) matching
    `layers_pattern` (any part if None) and is followed by a further part. `model.layers.3.mlp` -> 3."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [None])
    parts = key.split(".")
    for pattern in patterns:
        for i in range(len(parts) - 3, -1, -1):  # parts[i] a name, parts[i + 1] the number, parts[i + 2] exists
            if not parts[i + 1].isdigit():
                continue
            if pattern is None or any(
                user_regex_match(pattern, ".".join(parts[j : i + 1]), field="layers_pattern") for j in range(i + 1)
            ):
                return int(parts[i + 1])
    return None


def pattern_key(patterns: dict[str, Any], key: str, field: str = "rank_pattern") -> str | None:
    """The first rank/alpha pattern whose regex matches the end of the module name `key`."""
    for pattern in patterns:
        if user_regex_match(pattern, key, whole=False, field=field):
            return pattern
    return None


def _inside_any(key: str, entries: list[str] | ListMatcher) -> bool:
    """Whether `key` or one of its parent modules matches a list entry."""
    matcher = entries if isinstance(entries, ListMatcher) else ListMatcher(entries)
    parts = key.split(".")
    return any(matcher.matches(".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _closest_names(entry: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(entry, leaves, n=3, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(entry, names, n=2, cutoff=0.6) if n not in close]
    return ", ".join(repr(c) for c in close) if close else "none similar"


def _describe_leaves(names: list[str], limit: int = 12) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    shown = ", ".join(leaves[:limit])
    return shown + (", ..." if len(leaves) > limit else "")


# --------------------------------------------------------------------------------------------------------------
# The tuner
# --------------------------------------------------------------------------------------------------------------
class BaseTuner(nn.Module, abc.ABC):
    """Wraps a model and injects one method's layers into it.

    Subclasses set `prefix` (the parameter-name prefix of their adapter weights, e.g. ``"lora_"``) and implement
    `_create_and_replace` and `_default_target_modules`.
    """

    prefix: ClassVar[str] = ""
    #: Whether adapters share state across layers on the tuner (PEFT's VeRA-like methods); none of oxpeft's do,
    #: so every method can be injected directly (`inject_adapter_in_model`).
    uses_shared_state: ClassVar[bool] = False
    layer_cls: ClassVar[type[BaseTunerLayer]] = BaseTunerLayer

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | dict[str, PeftConfig],
        adapter_name: str = "default",
        *,
        strict_targets: bool = True,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        # As PEFT does: the adapted model carries its adapters' configs (the same dict), so a model whose layers
        # were injected directly (`inject_adapter_in_model`) saves and loads its adapter state too. A model that
        # already carries one (an earlier injection: transformers' `add_adapter` injects each adapter so) keeps it,
        # and the new adapters join the earlier ones.
        existing = model.__dict__.get("peft_config")
        carried = isinstance(existing, dict) and all(isinstance(c, PeftConfig) for c in existing.values())
        self.peft_config: dict[str, PeftConfig] = existing if carried else {}
        self.model.peft_config = self.peft_config
        self.active_adapter: str | list[str] = adapter_name
        self.autocast_adapter_dtype = autocast_adapter_dtype
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.inject_adapter(name, config, strict_targets=strict_targets, low_cpu_mem_usage=low_cpu_mem_usage)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward(*args, **kwargs)

    # --- hooks for subclasses ------------------------------------------------------------------------------------
    def _default_target_modules(self, model_type: str | None) -> list[str] | str | None:
        return None

    @abc.abstractmethod
    def _create_and_replace(
        self,
        config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        """Wrap `target` (child `target_name` of `parent`) for `adapter_name`, or add the adapter to its wrapper."""

    def _layer_cls_for(self, config: PeftConfig) -> type[BaseTunerLayer]:
        """The layer class that adapters of `config` live in (a mixed model holds several kinds)."""
        return self.layer_cls

    def _adapter_dtype(self, target: nn.Module) -> torch.dtype | None:
        """The dtype of new adapter weights: fp32 for half-precision bases (autocast_adapter_dtype), else the base's."""
        weight = target if isinstance(target, torch.Tensor) else getattr(target, "weight", None)
        if weight is None:
            weight = getattr(target, "in_proj_weight", None)  # nn.MultiheadAttention
        if weight is None or not weight.dtype.is_floating_point:
            return torch.float32
        if self.autocast_adapter_dtype and weight.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return weight.dtype

    def adapter_tensors_to_save(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str
    ) -> dict[str, torch.Tensor]:
        """Adjust an adapter's tensors (keyed by `model`'s state-dict keys) before they are written to a file.

        `model` is the module whose state dict the keys come from (the PeftModel or this tuner). The default keeps
        them as they are; AdaLoRA drops its pruned ranks here.
        """
        return tensors

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        """Refuse combinations that cannot hold together across several adapters."""
        bias = getattr(config, "bias", "none")
        others = [c for c in self.peft_config.values() if getattr(c, "bias", "none") != "none"]
        if self.peft_config and (bias != "none" or others):
            raise ValueError(
                "only one adapter of a model can train biases (bias != 'none'); set bias='none' on the others"
            )

    # --- injection -----------------------------------------------------------------------------------------------
    @contextmanager
    def adapter_dtype_autocast(self, enabled: bool) -> Iterator[None]:
        """Within the block, new adapters on a 16-bit base get fp32 weights if `enabled` (whatever the tuner's
        own `autocast_adapter_dtype`)."""
        previous, self.autocast_adapter_dtype = self.autocast_adapter_dtype, enabled
        try:
            yield
        finally:
            self.autocast_adapter_dtype = previous

    def inject_adapter(
        self, adapter_name: str, config: PeftConfig, *, strict_targets: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add adapter `adapter_name` to the model. On any error the model is left as it was.

        With `low_cpu_mem_usage` the adapter's weights are created on the meta device, uninitialised, for a state
        dict to be assigned to them (`set_peft_model_state_dict`), as PEFT does; initialisations that read the base
        weight (PiSSA, OLoRA, LoftQ) still run on real weights."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named '{adapter_name}' already exists; delete it first or pick another name")
        check_adapter_name(adapter_name)
        # The checks and target resolution work on a copy; only a successful injection writes them into the
        # caller's config, which is then the object stored (as PEFT keeps it), so a failure changes nothing.
        given, config = config, copy.copy(config)
        self._check_new_adapter_config(config)
        self._resolve_target_modules(config)

        modules_to_save = list(getattr(config, "modules_to_save", None) or [])
        all_names = self._candidate_module_names()
        targets = self._matching_targets(config, all_names, modules_to_save)
        self._check_targets_matched(config, all_names, targets, strict_targets)
        save_keys = [k for k in all_names if modules_to_save and matches_targets(modules_to_save, k)]
        auto_heads = classifier_modules_for(getattr(config, "task_type", None))
        unmatched_save = [e for e in ListMatcher(modules_to_save).unmatched(all_names) if e not in auto_heads]
        if unmatched_save:
            msg = "; ".join(f"{_shown(e)} (closest: {_closest_names(e, all_names)})" for e in unmatched_save[:_SHOWN_ENTRIES])
            raise ValueError(f"modules_to_save entries match no module: {msg}")
        if not getattr(config, "_tied_targets", None):  # ensure_weight_tying ties them (LoRA)
            self._warn_tied_targets(targets)

        given.__dict__.update(config.__dict__)
        config = given
        self.peft_config[adapter_name] = config
        on_meta = _ADAPTERS_ON_META.set(low_cpu_mem_usage and _meta_injection_possible(config))
        try:
            for key in targets:
                parent, target, target_name = self._get_submodules(key)
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            for key in save_keys:
                parent, target, target_name = self._get_submodules(key)
                if isinstance(target, ModulesToSaveWrapper):
                    target.update(adapter_name)
                else:
                    setattr(parent, target_name, ModulesToSaveWrapper(target, adapter_name))
            self._after_module_injection(config, adapter_name, targets)
        except BaseException:
            self._remove_adapter(adapter_name)
            del self.peft_config[adapter_name]
            raise
        finally:
            _ADAPTERS_ON_META.reset(on_meta)

        self._mark_only_adapters_as_trainable(config)
        self.set_adapter(self.active_adapters if self.active_adapters else adapter_name)
        if config.inference_mode:
            self._freeze_adapter(adapter_name)

    def _after_module_injection(self, config: PeftConfig, adapter_name: str, module_targets: list[str]) -> None:
        """What a method adapts beyond its target modules (LoRA: `target_parameters`; trainable tokens: the layers
        tied to the embedding), inside the injection's roll-back."""

    def _resolve_target_modules(self, config: PeftConfig) -> None:
        if not hasattr(config, "target_modules"):
            return
        if config.target_modules is None and getattr(config, "target_parameters", None):
            return  # only parameters are adapted
        if config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            default = self._default_target_modules(model_type)
            if default is None:
                raise ValueError(
                    f"Please specify `target_modules` in `peft_config`: oxpeft has no default for model_type "
                    f"{model_type!r} (e.g. a list of module names, or 'all-linear'). Linear modules here: "
                    f"{_describe_leaves(self._linear_module_names())}"
                )
            config.target_modules = set(default) if isinstance(default, list) else default
        elif config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            config.target_modules = self._all_linear_names()

    def _linear_module_names(self) -> list[str]:
        names = []
        for name in self._candidate_module_names():
            module = self.model.get_submodule(name)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if is_linear_like(base):
                names.append(name)
        return names

    def _all_linear_names(self) -> set[str]:
        names = {n.rsplit(".", 1)[-1] for n in self._linear_module_names()}
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if output is not None:
            for n, m in self.model.named_modules():
                if m is output:
                    names.discard(n.rsplit(".", 1)[-1])
        if not names:
            raise ValueError("target_modules='all-linear' found no Linear layer in the model")
        return names

    def _candidate_module_names(self) -> list[str]:
        """Module names that can be targeted: everything except the insides of adapter layers and wrappers."""
        inner_prefixes: list[str] = []
        names: list[str] = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(p) for p in inner_prefixes):
                continue
            names.append(name)
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                inner_prefixes.append(name + ".")
        return names

    def _matching_targets(self, config: PeftConfig, names: list[str], modules_to_save: list[str]) -> list[str]:
        if getattr(config, "target_modules", None) is None:
            return []
        rule = TargetRule(config)
        saved = ListMatcher(modules_to_save) if modules_to_save else None
        return [key for key in names if rule.matches(key) and not (saved is not None and _inside_any(key, saved))]

    def _check_targets_matched(
        self, config: PeftConfig, names: list[str], targets: list[str], strict: bool
    ) -> None:
        target_modules = getattr(config, "target_modules", None)
        if target_modules is None:
            return
        problems: list[str] = []
        if isinstance(target_modules, str):
            if not targets:
                problems.append(
                    f"the regex target_modules={_shown(target_modules)} matches no module name (it must match the "
                    f"WHOLE name, e.g. r'.*\\.q_proj'); module names end in: {_describe_leaves(names)}"
                )
        else:
            unmatched = ListMatcher(target_modules).unmatched(names)
            for entry in unmatched[:_SHOWN_ENTRIES]:
                problems.append(f"{_shown(entry)} matches no module (closest: {_closest_names(entry, names)})")
            if len(unmatched) > _SHOWN_ENTRIES:
                problems.append(f"and {len(unmatched) - _SHOWN_ENTRIES:,} more entries that match no module")
            if not problems and not targets and not getattr(config, "target_parameters", None):
                problems.append("no module is left after exclude_modules / layers_to_transform / modules_to_save")
        if not problems:
            return
        message = "target_modules: " + "; ".join(problems)
        if strict:
            raise NoMatchingPeftModuleError(message)
        warnings.warn(message, PeftWarning, stacklevel=4)

    def _warn_tied_targets(self, targets: list[str]) -> None:
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if output is None:
            return
        for key in targets:
            module = self.model.get_submodule(key)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if module is not output and getattr(base, "weight", None) is getattr(output, "weight", False):
                warnings.warn(
                    f"'{key}' shares its weight with the output layer (tied embeddings). The adapter changes only "
                    f"'{key}'; merging unties the two so the output layer keeps the original weight.",
                    stacklevel=4,
                )

    def _get_submodules(self, key: str) -> tuple[nn.Module, nn.Module, str]:
        return _get_submodules(self.model, key)

    def _adapter_prefixes(self) -> set[str]:
        """The parameter-name prefixes of this tuner's adapter weights."""
        return {self.prefix}

    def _mark_only_adapters_as_trainable(self, config: PeftConfig) -> None:
        prefixes = self._adapter_prefixes()
        for name, param in self.model.named_parameters():
            if not any(p in name for p in prefixes) and ".modules_to_save." not in name:
                param.requires_grad_(False)
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, param in self.model.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)
        elif bias.endswith("_only"):
            layer_cls = self._layer_cls_for(config)
            for module in self.model.modules():
                if isinstance(module, layer_cls) and getattr(module.get_base_layer(), "bias", None) is not None:
                    module.get_base_layer().bias.requires_grad_(True)
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module._freeze_non_trainable_peft_weights()

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the model) of the modules that adapter layers wrap, in module order."""
        return [name for name, module in self._tuner_modules() if isinstance(module, BaseTunerLayer)]

    def _freeze_adapter(self, adapter_name: str) -> None:
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                for p in module.adapter_parameters(adapter_name):
                    p.requires_grad_(False)
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].requires_grad_(False)

    # --- adapter management --------------------------------------------------------------------------------------
    def _tuner_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The adapter layers and modules_to_save wrappers, in `named_modules` order. A tuner layer's adapter
        containers are not walked (only its base layer is): with many adapters they hold most of the modules,
        and set_adapter / disable_adapter walk the model every time."""
        stack: list[tuple[str, nn.Module]] = [("", self.model)]
        while stack:
            name, module = stack.pop()
            children: Iterable[tuple[str, nn.Module | None]] = module._modules.items()
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                yield name, module
                if isinstance(module, BaseTunerLayer):
                    children = [] if module.owns_inner_layers else [("base_layer", module._modules.get("base_layer"))]
            prefix = name + "." if name else ""
            stack.extend((prefix + key, child) for key, child in reversed(list(children)) if child is not None)

    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; loaded adapters: {sorted(self.peft_config)}")
        modules = [module for _, module in self._tuner_modules()]
        for module in modules:  # everything is checked before anything changes
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.check_set_adapter(names)
        for module in modules:
            module.set_adapter(names)
        for name in names:
            if self.peft_config[name].inference_mode:
                self._freeze_adapter(name)
        self.active_adapter = names[0] if len(names) == 1 else names

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, module in self._tuner_modules():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; loaded adapters: {sorted(self.peft_config)}")
        merged = any(
            isinstance(module, BaseTunerLayer) and adapter_name in module.merged_adapters
            for _, module in self._tuner_modules()
        )
        if merged:
            # Its delta is in the base weights: deleting it would leave them changed for good.
            raise ValueError(
                f"Cannot delete adapter(s) ['{adapter_name}'] while they are merged. Please unmerge them first."
            )
        self._remove_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapter = []

    def _remove_adapter(self, adapter_name: str) -> None:
        """Drop an adapter's weights everywhere; a layer or wrapper left with no adapter is unwrapped (one level:
        in a mixed model a layer may wrap another method's layer, which keeps its own adapters). Innermost first,
        so that each unwrap replaces the layer in the parent it has at that moment."""
        for key, module in reversed(list(self._tuner_modules())):
            module.delete_adapter(adapter_name)
            empty = (
                not module.adapter_names()
                if isinstance(module, BaseTunerLayer)
                else len(module.modules_to_save) == 0
            )
            if empty:
                parent, _, target_name = self._get_submodules(key)
                base = module.unwrapped_base() if isinstance(module, BaseTunerLayer) else module.original_module
                setattr(parent, target_name, base)

    # --- merge / unload ------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights in place (the layers stay, and can be unmerged)."""
        self._untie_targeted_embeddings()
        for _, module in self._tuner_modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, module in self._tuner_modules():
            if isinstance(module, BaseTunerLayer):
                module.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge the active (or named) adapters into the base weights and return the plain base model.

        Quantised base layers become Linear layers (dequantised weight + delta, in the dtype the weight had
        before quantisation) unless `requantize=True`, which quantises the merged weight again (lossy, with a warning).
        """
        return self._unload_and_optionally_merge(True, progressbar, safe_merge, adapter_names, requantize)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the plain base model."""
        return self._unload_and_optionally_merge(False, False, False, None)

    def _unload_and_optionally_merge(
        self,
        merge: bool,
        progressbar: bool,
        safe_merge: bool,
        adapter_names: list[str] | None,
        requantize: bool = False,
    ) -> nn.Module:
        if merge:
            self._untie_targeted_embeddings()
        # Innermost first: in a mixed model a layer may wrap another method's layer; each merges into the shared
        # base weight, and is then replaced by what it wraps in the parent it has at that moment.
        keys = [k for k, _ in self._tuner_modules()][::-1]
        for key in tqdm(keys, desc="Unloading" + (" and merging" if merge else ""), disable=not progressbar):
            try:
                parent, module, target_name = self._get_submodules(key)
            except AttributeError:  # inside a module replaced earlier in this loop
                continue
            if isinstance(module, BaseTunerLayer):
                if merge:
                    if not requantize and hasattr(module, "dequantize_base"):
                        module.dequantize_base()
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, target_name, module.unwrapped_base())
            elif isinstance(module, ModulesToSaveWrapper):
                setattr(parent, target_name, module.unwrapped())
        if self.model.__dict__.get("peft_config") is self.peft_config:
            del self.model.peft_config  # no adapter is left in the model
        return self.model

    def _untie_targeted_embeddings(self) -> None:
        """Give the output layer its own weight before an input-embedding adapter is merged into a tied weight."""
        if not hasattr(self.model, "get_output_embeddings"):
            return
        output = self.model.get_output_embeddings()
        if output is None or not hasattr(output, "weight"):
            return
        for _, module in self._tuner_modules():
            if (
                isinstance(module, BaseTunerLayer)
                and not module.keeps_tying
                and getattr(module.get_base_layer(), "weight", None) is output.weight
            ):
                output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=False)
                config = getattr(self.model, "config", None)
                if config is not None:
                    config.tie_word_embeddings = False
                    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
                    if text_config is not None:
                        text_config.tie_word_embeddings = False
                return

    @contextmanager
    def batch_adapters(self, adapter_names: list[str]) -> Iterator[None]:
        """Within the block, sample i of a batch uses adapter `adapter_names[i]` ("__base__": none)."""
        unknown = sorted({n for n in adapter_names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; loaded: {sorted(self.peft_config)}")
        unsupported = sorted(
            {
                type(m).__name__
                for _, m in self._tuner_modules()
                if isinstance(m, BaseTunerLayer) and not hasattr(m, "_batch_adapter_names")
            }
        )
        if unsupported:
            raise ValueError(f"per-sample adapter_names is not supported by {', '.join(unsupported)} layers")
        layers = [m for _, m in self._tuner_modules() if hasattr(m, "_batch_adapter_names")]
        for layer in layers:
            layer._batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer._batch_adapter_names = None

    @contextmanager
    def _adapters_disabled(self) -> Iterator[None]:
        # Each layer gets back the state it had, so nested blocks and layers disabled beforehand stay as they were.
        before = [(module, module.disable_adapters) for _, module in self._tuner_modules()]
        if len({disabled for module, disabled in before if isinstance(module, BaseTunerLayer)}) > 1:
            # PEFT's wording (code matches on it); unlike PEFT, which then enables every layer, each layer gets
            # its own state back.
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, each layer gets back the state it "
                "had before",
                stacklevel=4,
            )
        self.disable_adapter_layers()
        try:
            yield
        finally:
            for module, disabled in before:
                module.enable_adapters(not disabled)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether any adapter layer has an active adapter and is not disabled (a forward would use an adapter)."""
        return any(
            isinstance(module, BaseTunerLayer) and module.active_adapters and not module.disable_adapters
            for _, module in self._tuner_modules()
        )


def check_adapters_to_combine(tuner: BaseTuner, adapters: list[str], weights: list[float]) -> None:
    """`add_weighted_adapter` preconditions shared by the methods that have it."""
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; loaded adapters: {sorted(tuner.peft_config)}")
    if len(adapters) != len(weights):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights")
    for wrapper in tuner.model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise ValueError("cannot combine adapters that each have their own copy of the same modules_to_save module")


def union_module_names(values: list[str | set[str] | None], field_name: str) -> set[str] | str:
    """The union of several adapters' module-name fields: a set of names, or an alternation of regexes."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, str) for v in present):
        return "|".join(f"({v})" for v in present)
    if any(isinstance(v, str) for v in present):
        raise ValueError(f"cannot combine adapters whose {field_name} mix regex strings and lists")
    return set().union(*present)


def classifier_modules_for(task_type: TaskType | str | None) -> list[str]:
    """Heads that PEFT adds to `modules_to_save` for a task, so a classifier trains and saves with the adapter."""
    task = TaskType(task_type) if task_type else None
    if task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        return ["classifier", "score"]
    if task is TaskType.QUESTION_ANS:
        return ["qa_outputs"]
    return []


# --- functions on a model with injected adapters (no PeftModel around it); `oxpeft.functional` exports them ------
def set_adapter(
    model: nn.Module,
    adapter_name: str | list[str],
    inference_mode: bool = False,
    layer_cls: type[BaseTunerLayer] = BaseTunerLayer,
) -> None:
    """Make `adapter_name` (one or several) the active adapter(s) of every adapter layer and wrapper in `model`,
    trainable unless `inference_mode`. A merged layer is unmerged first, with a warning (its weights cannot run
    another adapter)."""
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            module.set_adapter(adapter_name, inference_mode=inference_mode)
        elif isinstance(module, layer_cls):
            if module.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
                module.unmerge()
            module.set_adapter(adapter_name, inference_mode=inference_mode)


def delete_adapter(
    model: nn.Module, adapter_name: str, prefix: str, layer_cls: type[BaseTunerLayer] = BaseTunerLayer
) -> list[str] | None:
    """Remove adapter `adapter_name`'s weights from every adapter layer (of `layer_cls`, outside the adapters'
    own `prefix` modules) and wrapper of `model`. The layers stay in place, even when empty; the model's
    `peft_config` is not touched. Returns the adapters that are active afterwards (None if no layer was found)."""
    active: list[str] | None = None
    for name, module in model.named_modules():
        if prefix in name:
            continue
        if isinstance(module, layer_cls):
            module.delete_adapter(adapter_name)
            if active is None:
                active = list(module.active_adapters)
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            module.delete_adapter(adapter_name, new_active_adapters=active)
    return active


# Floating-point dtypes that adapter weights are upcast from (to float32) for stable training.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast adapter `adapter_name`'s float16 / bfloat16 weights in `model` to float32 (a no-op unless
    `autocast_adapter_dtype`). The parameters are converted in place, so optimiser references stay valid."""
    if not autocast_adapter_dtype:
        return
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for param in module.adapter_parameters(adapter_name):
                if param.dtype in _UPCAST_DTYPES:
                    param.data = param.data.float()


def set_requires_grad(model: nn.Module, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
    """Switch gradients of the named adapters' weights (adapter layers and wrappers) on or off."""
    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module.set_requires_grad(adapter_names, requires_grad)
