"""`LoraModel`: injects LoRA layers into the target modules of a model."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, matches_list_entry, pattern_key
from oxpeft.utils.error import NoMatchingPeftModuleError
from oxpeft.utils.other import ModulesToSaveWrapper
from oxpeft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from oxpeft.tuners.lora.bdlora import apply_bdlora
from oxpeft.tuners.lora.kasa import add_kasa, kasa_loss, truncate_base
from oxpeft.tuners.lora.monteclora import add_monteclora
from oxpeft.tuners.lora.tied import tie_to_embedding
from oxpeft.tuners.lora.config import LoraConfig
from oxpeft.tuners.lora.dispatch import lora_layer_for
from oxpeft.tuners.lora.layer import LoraLayer, warn_fan_in_fan_out
from oxpeft.tuners.lora.param import ParamWrapper
from oxpeft.tuners.trainable_tokens.model import (
    add_token_rows,
    input_embeddings_name,
    output_layers_tied_to_embedding,
    tie_output_layers,
)
from oxpeft.tuners.lora.weighted import add_weighted_adapter


def _layer_options(config: LoraConfig, key: str) -> dict:
    """The LoRA layer options for the module or parameter `key` (rank / alpha patterns applied)."""
    rank_key = pattern_key(config.rank_pattern, key)
    alpha_key = pattern_key(config.alpha_pattern, key, field="alpha_pattern")
    return dict(
        r=config.rank_pattern[rank_key] if rank_key is not None else config.r,
        lora_alpha=config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=config.init_lora_weights,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
        ephemeral_gpu_offload=config.runtime_config.ephemeral_gpu_offload,
    )


def _apply_variants(layer: nn.Module, adapter_name: str, config: LoraConfig, key: str) -> None:
    """The LoRA variants a new adapter of `layer` takes from its config (BD-LoRA, VeLoRA, KaSA)."""
    if config.use_bdlora is not None:
        apply_bdlora(layer, adapter_name, config.use_bdlora, key)
    if config.velora_config is not None:
        if type(layer).__name__ != "Linear":
            raise ValueError(f"VeLoRA applies to LoRA on Linear layers; '{key}' is a {type(layer).__name__}")
        layer._velora.add(layer, adapter_name, config.velora_config)
    if config.kasa_config is not None:
        add_kasa(layer, adapter_name, key)
    if config.monteclora_config is not None:
        add_monteclora(layer, adapter_name, config.monteclora_config, key)


def _strip_base_layer(name: str) -> str:
    """A module name without the `.base_layer` steps that wrappers insert."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _wrapper_of(module: nn.Module, param_name: str) -> ParamWrapper | None:
    """The ParamWrapper (in a nest of them starting at `module`) that adapts `param_name`, if any."""
    while isinstance(module, ParamWrapper):
        if module.parameter_name == param_name:
            return module
        module = module.base_layer
    return None


class LoraModel(BaseTuner):
    """The LoRA tuner. Usually created through `get_peft_model`."""

    prefix = "lora_"
    layer_cls = LoraLayer

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")

    def _create_and_replace(
        self,
        config: LoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        options = _layer_options(config, current_key)
        loftq = config.init_lora_weights == "loftq"
        if loftq:
            options["init_lora_weights"] = True  # the LoftQ fit below replaces both factors
        if isinstance(target, LoraLayer):
            if loftq:
                raise ValueError(f"'{current_key}' already has an adapter; LoftQ initialises a layer's first adapter only")
            target.update_layer(adapter_name, adapter_dtype=self._adapter_dtype(target.get_base_layer()), **options)
            _apply_variants(target, adapter_name, config, current_key)
            return
        layer_cls, required_fifo = lora_layer_for(target)
        kwargs = dict(options, adapter_dtype=self._adapter_dtype(target))
        if layer_cls.__name__ == "Linear":
            fifo = config.fan_in_fan_out if required_fifo is None else required_fifo
            warn_fan_in_fan_out(current_key, fifo, config.fan_in_fan_out)
            kwargs["fan_in_fan_out"] = fifo
        new_module = layer_cls(target, adapter_name, **kwargs)
        if loftq:
            new_module.loftq_init(adapter_name, config.loftq_config)
        _apply_variants(new_module, adapter_name, config, current_key)
        setattr(parent, target_name, new_module)

    def _resolve_target_modules(self, config: PeftConfig) -> None:
        super()._resolve_target_modules(config)
        if getattr(config, "ensure_weight_tying", False) and config.target_modules is not None:
            self._plan_weight_tying(config)

    def _plan_weight_tying(self, config: LoraConfig) -> None:
        """`ensure_weight_tying` with the input embedding or a layer tied to it among the targets: the adapter goes
        on the embedding, and the tied output layers take it too, tied (see tied.py), after the other targets."""
        tied = output_layers_tied_to_embedding(self.model)
        embedding = input_embeddings_name(self.model)
        pair = [embedding, *tied]
        targets = config.target_modules
        if isinstance(targets, str):
            in_targets = any(re.fullmatch(targets, name) for name in pair)
        else:
            in_targets = any(matches_list_entry(name, entry) for name in pair for entry in targets)
        saved = any(matches_list_entry(name, e) for name in pair for e in config.modules_to_save or [])
        if not tied:
            if config.trainable_token_indices is None:  # the trainable tokens warn for themselves
                warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model", stacklevel=5)
            return
        if saved:
            # PEFT's rewrite: the embedding's copy is trained, and the tied layers' copies share its weight.
            kept = [e for e in config.modules_to_save if not any(matches_list_entry(t, e) for t in tied)]
            config.modules_to_save = kept + ([embedding] if embedding not in kept else [])
            config._tied_saves = tied
            return
        if not in_targets:
            if config.trainable_token_indices is None:
                warnings.warn(
                    "You have requested `ensure_weight_tying`, but no tied modules are added in either "
                    "`modules_to_save` or `target_modules`",
                    stacklevel=5,
                )
            return
        if config.use_dora:
            raise ValueError("ensure_weight_tying=True cannot tie DoRA adapters: each layer would have its own magnitude")
        # PEFT's rewrite (so that files move both ways): the embedding joins the targets, the tied layers leave them.
        if isinstance(targets, str):
            config.target_modules = rf"(?:{targets}|^{re.escape(embedding)}$)"
        else:
            config.target_modules = {e for e in targets if not any(matches_list_entry(t, e) for t in tied)} | {embedding}
        config._tied_targets = tied

    def _matching_targets(self, config: PeftConfig, names: list[str], modules_to_save: list[str]) -> list[str]:
        tied = getattr(config, "_tied_targets", ())
        return [k for k in super()._matching_targets(config, names, modules_to_save) if k not in tied]

    def _tie_output_layers(self, config: LoraConfig, adapter_name: str) -> None:
        embedding_layer = self.model.get_input_embeddings()
        for key in getattr(config, "_tied_targets", ()):
            parent, target, target_name = self._get_submodules(key)
            options = dict(_layer_options(config, key), init_lora_weights=False, use_dora=False)
            if isinstance(target, LoraLayer):
                target.update_layer(adapter_name, adapter_dtype=self._adapter_dtype(target.get_base_layer()), **options)
            else:
                layer_cls, fifo = lora_layer_for(target)
                target = layer_cls(target, adapter_name, fan_in_fan_out=bool(fifo), adapter_dtype=self._adapter_dtype(target), **options)
                setattr(parent, target_name, target)
            tie_to_embedding(target, embedding_layer, adapter_name)

    def _tie_saved_output_layers(self, config: LoraConfig, adapter_name: str) -> None:
        """`modules_to_save` with `ensure_weight_tying`: each tied layer's trained copy shares the weight of the
        embedding's trained copy (one parameter, so the model stays tied through training, saving and unloading)."""
        source = self.model.get_input_embeddings()
        if not isinstance(source, ModulesToSaveWrapper) or adapter_name not in source.modules_to_save:
            raise ValueError("ensure_weight_tying: the input embedding has no trained copy to tie the output layer to")
        for key in config._tied_saves:
            parent, target, target_name = self._get_submodules(key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            else:
                target = ModulesToSaveWrapper(target, adapter_name)
                setattr(parent, target_name, target)
            target.modules_to_save[adapter_name].weight = source.modules_to_save[adapter_name].weight

    def _after_module_injection(self, config: LoraConfig, adapter_name: str, module_targets: list[str]) -> None:
        if getattr(config, "_tied_saves", None):
            self._tie_saved_output_layers(config, adapter_name)
        if getattr(config, "_tied_targets", None):
            self._tie_output_layers(config, adapter_name)
        self._inject_parameters(config, adapter_name, module_targets)
        if config.trainable_token_indices is not None:
            self._inject_trainable_tokens(config, adapter_name)
        if config.kasa_config is not None:
            # Last, once every layer took the adapter: KaSA's truncation of the base weights cannot be undone.
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and adapter_name in module.lora_diag:
                    truncate_base(module, adapter_name)

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        super()._check_new_adapter_config(config)
        # KaSA truncates the base weights when its adapter is added: what other adapters see depends on the order.
        kasa = getattr(config, "kasa_config", None) is not None
        for name, other in self.peft_config.items():
            if (getattr(other, "kasa_config", None) is not None) != kasa:
                raise ValueError(
                    "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: "
                    f"the new adapter {'uses' if kasa else 'does not use'} KaSA but adapter '{name}' "
                    f"{'does not' if kasa else 'does'}."
                )

    def _get_monteclora_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """MonteCLoRA's variational loss (KL terms and the entropy term) of the adapters among `adapter_names`
        (default: the active ones), averaged over their layers; 0.0 outside training or without MonteCLoRA. Add it
        to the task loss (`oxpeft.helpers.MontecloraTrainerMixin` does so for a Trainer)."""
        names = self.active_adapters if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        total: torch.Tensor | float = 0.0
        count = 0
        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in names:
                if name in module.lora_monteclora_sampler:
                    kl, entropy = module.lora_monteclora_sampler[name].variational_loss()
                    total, count = total + kl + entropy, count + 1
        return total / count if count else 0.0

    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """KaSA's regularisers summed over the layers of the KaSA adapters among `adapter_names` (default: the
        active ones), with each adapter's `beta` and `gamma`; 0.0 when there are none. Add it to the task loss."""
        names = self.active_adapters if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        total: torch.Tensor | float = 0.0
        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in names:
                if name in module.lora_diag:
                    settings = self.peft_config[name].kasa_config
                    total = total + kasa_loss(module, name, settings.beta, settings.gamma)
        return total

    def _inject_trainable_tokens(self, config: LoraConfig, adapter_name: str) -> None:
        """`trainable_token_indices`: the listed rows of the input embedding (a list), or of each named embedding
        layer (a dict), train beside the LoRA weights. With tied embeddings the output layer follows the
        embedding's rows, unless the dict gives it other rows (then each trains its own; with
        `ensure_weight_tying=True` that is an error), as PEFT does."""
        indices = config.trainable_token_indices
        embedding_name = input_embeddings_name(self.model)
        layers = dict(indices) if isinstance(indices, dict) else {embedding_name: indices}
        for entry in layers:
            if config.modules_to_save and entry in config.modules_to_save:
                raise ValueError(
                    "The embedding layer is already marked to be trained fully, either specify "
                    f'`modules_to_save=[..., "{entry}", ...]` or `trainable_tokens={{\'{entry}\': x}}` but not both.'
                )
        tied = bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))
        tied_outputs = output_layers_tied_to_embedding(self.model) if tied else []
        tied_entries = [e for e in layers if matches_list_entry(embedding_name, e)] + [
            e for e in layers if any(matches_list_entry(name, e) for name in tied_outputs)
        ]
        mismatch = any(layers[e] != layers[tied_entries[0]] for e in tied_entries[1:])
        if mismatch and config.ensure_weight_tying:
            shown = ", ".join(f"{e}: {layers[e]}" for e in tied_entries)
            raise ValueError(
                "Cannot ensure weight tying when different token indices are specified for tied layers. "
                f"Conflicting layers: {shown}. Please use the same indices for all tied layers or set "
                "ensure_weight_tying=False."
            )
        if config.ensure_weight_tying and not tied:
            warnings.warn(
                "ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                "Weight tying will not be applied for trainable_token_indices.",
                stacklevel=5,
            )
        names = self._candidate_module_names()
        for entry, rows in layers.items():
            if tied and not mismatch and entry in tied_entries and not matches_list_entry(embedding_name, entry):
                continue  # the output layer follows the embedding's rows
            keys = [k for k in names if matches_list_entry(k, entry)]
            if not keys:
                raise ValueError(f"trainable_token_indices: '{entry}' matches no module of the model")
            for key in keys:
                add_token_rows(self, adapter_name, key, rows, True, auxiliary=True)
        if not mismatch:
            tie_output_layers(self, adapter_name, auxiliary=True)

    def _inject_parameters(self, config: LoraConfig, adapter_name: str, module_targets: list[str]) -> None:
        """`target_parameters`: wrap each matching parameter (a name equal to, or ending in, an entry) in a
        ParamWrapper, as PEFT does: modules in `named_modules` order and their own parameters in registration order,
        so that several parameters of one module nest the same way (the later one outside) and the saved keys are
        PEFT's; a parameter an earlier adapter wrapped gets the new adapter in that wrapper."""
        entries = sorted(set(config.target_parameters or []))
        if not entries:
            return
        found: list[str] = []
        for module_name, module in list(self.model.named_modules()):
            unwrapped = _strip_base_layer(module_name)
            for param_name, _ in list(module.named_parameters(recurse=False)):
                key = f"{unwrapped}.{param_name}" if unwrapped else param_name
                if not any(key == e or key.endswith(f".{e}") for e in entries):
                    continue
                if module_name == "":
                    raise ValueError(
                        f"target_parameters: '{param_name}' belongs to the model itself; only parameters of its "
                        "submodules can be adapted"
                    )
                holder = self.model.get_submodule(unwrapped)
                if isinstance(holder, BaseTunerLayer) and not isinstance(holder, ParamWrapper):
                    raise ValueError(
                        f"target_parameters: '{key}' belongs to '{unwrapped}', which target_modules already adapts "
                        f"({type(holder).__name__}); leave it out of target_modules (target_modules=[] adapts no "
                        "module)"
                    )
                options = _layer_options(config, key)
                options.pop("ephemeral_gpu_offload")
                existing = _wrapper_of(holder, param_name)
                if existing is not None:
                    existing.update_layer(adapter_name, adapter_dtype=self._adapter_dtype(existing.get_param()), **options)
                else:
                    parent, target, target_name = self._get_submodules(module_name)
                    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
                    dtype = self._adapter_dtype(getattr(base, param_name))
                    wrapper = ParamWrapper(target, adapter_name, param_name, adapter_dtype=dtype, **options)
                    setattr(parent, target_name, wrapper)
                found.append(key)
        if not found and not module_targets:
            raise NoMatchingPeftModuleError(
                f"target_parameters={entries} match no parameter of the model (an entry must equal a parameter's "
                "full name or its end, e.g. 'mlp.experts.gate_up_proj')"
            )
        if not found:
            warnings.warn(f"target_parameters={entries} were set but no parameter was matched.", RuntimeWarning)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Create `adapter_name` from a weighted combination of existing adapters (see `tuners.lora.weighted`).

        The new adapter is inactive and frozen; call `set_adapter(adapter_name)` to use it.
        """
        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            density=density,
            majority_sign_method=majority_sign_method,  # type: ignore[arg-type]
        )
