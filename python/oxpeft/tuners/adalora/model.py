"""`AdaLoraModel`: injects AdaLoRA layers, adds the orthogonality penalty to the training loss and runs the
rank budget (`update_and_allocate`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from oxpeft.tuners.adalora.allocator import RankAllocator, rank_mask
from oxpeft.tuners.adalora.config import AdaLoraConfig
from oxpeft.tuners.adalora.layer import AdaLoraLayer
from oxpeft.tuners.tuners_utils import BaseTuner
from oxpeft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING



class AdaLoraModel(BaseTuner):
    """The AdaLoRA tuner. Usually created through `get_peft_model`.

    One adapter trains at a time (the others must be loaded with inference_mode=True). In training mode, when the
    model's output has a `loss`, ``orth_reg_weight * orthogonal_regularization()`` is added to it. Call
    `update_and_allocate(step)` after every `loss.backward()` and before `optimizer.zero_grad()`.
    """

    prefix = "lora_"
    layer_cls = AdaLoraLayer

    trainable_adapter_name: str | None = None
    rank_allocator: RankAllocator | None = None

    def __init__(
        self,
        model: nn.Module,
        peft_config: AdaLoraConfig | dict[str, AdaLoraConfig],
        adapter_name: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._loss_hook = self.model.register_forward_hook(self._add_orthogonal_regularization)

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING.get(model_type or "")

    # --- adapters ------------------------------------------------------------------------------------------------
    def _check_new_adapter_config(self, config: AdaLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ValueError(
                f"AdaLoraModel supports only 1 trainable adapter and '{self.trainable_adapter_name}' is trainable; "
                "add the other adapters with inference_mode=True"
            )

    def inject_adapter(
        self, adapter_name: str, config: AdaLoraConfig, *, strict_targets: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        super().inject_adapter(adapter_name, config, strict_targets=strict_targets, low_cpu_mem_usage=low_cpu_mem_usage)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            layers = self._layers(adapter_name)
            self.rank_allocator = RankAllocator(self.peft_config[adapter_name], layers, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.rank_allocator = None

    def _layers(self, adapter_name: str) -> dict[str, AdaLoraLayer]:
        return {
            key: module
            for key, module in self.model.named_modules()
            if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_A
        }

    def _create_and_replace(
        self,
        config: AdaLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        # A saved rank pattern gives each module its kept rank; ranknum stays init_r so the scale is unchanged.
        mask = rank_mask(config.rank_pattern or {}, current_key, adapter_name)
        r = sum(bool(v) for v in mask) if mask is not None else config.init_r
        options = dict(
            r=r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            ranknum=config.init_r,
        )
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, adapter_dtype=self._adapter_dtype(target.get_base_layer()), **options)
            return
        from transformers.pytorch_utils import Conv1D

        required = isinstance(target, Conv1D)
        if isinstance(target, (nn.Linear, Conv1D, nn.Conv2d)) and required != config.fan_in_fan_out:
            warnings.warn(
                f"'{current_key}': fan_in_fan_out={config.fan_in_fan_out} does not fit its layer type; using "
                f"{required}",
                stacklevel=4,
            )
        try:
            new_module = AdaLoraLayer(
                target, adapter_name, fan_in_fan_out=required, adapter_dtype=self._adapter_dtype(target), **options
            )
        except ValueError as exc:
            raise ValueError(f"'{current_key}': {exc}") from None
        setattr(parent, target_name, new_module)

    # --- training ------------------------------------------------------------------------------------------------
    def orthogonal_regularization(self, adapter_name: str | None = None) -> torch.Tensor:
        """Mean over the adapter's A and B matrices of ``||A A^T - I||_F`` / ``||B^T B - I||_F``."""
        name = adapter_name or self.trainable_adapter_name
        if name is None:
            raise ValueError("no trainable AdaLoRA adapter; name the adapter to compute the penalty for")
        penalties = [p for layer in self._layers(name).values() for p in layer.orthogonality_penalty(name)]
        if not penalties:
            return torch.zeros(())
        return torch.stack(penalties).mean()

    def _add_orthogonal_regularization(self, module: nn.Module, args: Any, output: Any) -> Any:
        name = self.trainable_adapter_name
        loss = getattr(output, "loss", None)
        if name is None or not module.training or not isinstance(loss, torch.Tensor):
            return None
        weight = self.peft_config[name].orth_reg_weight
        if weight == 0:
            return None
        output.loss = loss + weight * self.orthogonal_regularization(name).to(loss.device)
        return output

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and prune ranks to the step's budget (call after backward, before zero_grad).

        At step ``total_step - tfinal`` the final allocation is made and stored in the adapter config's
        `rank_pattern`, which is saved with the adapter; later steps keep the pruned triplets at zero.
        """
        name = self.trainable_adapter_name
        if name is None or self.rank_allocator is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False)")
        config: AdaLoraConfig = self.peft_config[name]
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            pattern = self.rank_allocator.update_and_allocate(global_step)
            if pattern is not None:
                config.rank_pattern = pattern
        elif global_step == final_step:
            config.rank_pattern = self.rank_allocator.update_and_allocate(global_step, force_mask=True)
            self.rank_allocator.reset_importance()
        elif config.rank_pattern is not None:
            self.rank_allocator.apply_rank_pattern(config.rank_pattern)

    # --- saving / unloading --------------------------------------------------------------------------------------
    def adapter_tensors_to_save(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str
    ) -> dict[str, torch.Tensor]:
        """Keep only the triplets the rank pattern keeps (HF PEFT's file layout)."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        own_keys = {id(module): key for key, module in self.model.named_modules()}
        out = dict(tensors)
        for name, module in model.named_modules():
            if not isinstance(module, AdaLoraLayer) or adapter_name not in module.lora_A:
                continue
            mask = rank_mask(pattern, own_keys[id(module)], adapter_name)
            r = module.r[adapter_name]
            if mask is None or sum(bool(v) for v in mask) == r:
                continue  # nothing pruned, or the layer was created at its pruned size (loaded adapter)
            if len(mask) != r:
                raise ValueError(f"rank_pattern for '{own_keys[id(module)]}' has {len(mask)} entries, its rank is {r}")
            prefix = f"{name}." if name else ""
            keep = torch.tensor([bool(v) for v in mask], device=module.lora_A[adapter_name].device)
            out[f"{prefix}lora_A.{adapter_name}"] = module.lora_A[adapter_name][keep]
            out[f"{prefix}lora_E.{adapter_name}"] = module.lora_E[adapter_name][keep]
            out[f"{prefix}lora_B.{adapter_name}"] = module.lora_B[adapter_name][:, keep]
        return out

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        self._loss_hook.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)
