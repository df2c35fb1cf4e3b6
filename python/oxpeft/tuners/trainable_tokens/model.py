"""`TrainableTokensModel`: puts TrainableTokensLayers on the target embeddings, and on the layers tied to them."""

from __future__ import annotations

from torch import nn

from oxpeft.tuners.trainable_tokens.config import TrainableTokensConfig
from oxpeft.tuners.trainable_tokens.layer import TrainableTokensLayer
from oxpeft.tuners.tuners_utils import BaseTuner


def input_embeddings_name(model: nn.Module, default: str = "embed_tokens") -> str:
    """The full module name of the model's input embedding layer (`default` when it has none)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is not None:
        for name, module in model.named_modules():
            if module is embedding:
                return name
    return default


class TrainableTokensModel(BaseTuner):
    """The trainable-tokens tuner. Usually created through `get_peft_model(model, TrainableTokensConfig(...))`."""

    prefix = "trainable_tokens_"
    layer_cls = TrainableTokensLayer

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return None

    def _resolve_target_modules(self, config: TrainableTokensConfig) -> None:
        if config.target_modules is None:
            config.target_modules = input_embeddings_name(self.model)

    def _create_and_replace(
        self,
        config: TrainableTokensConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, TrainableTokensLayer):
            target.update_layer(adapter_name, config.token_indices, config.init_weights)
            return
        setattr(parent, target_name, TrainableTokensLayer(target, adapter_name, config.token_indices, config.init_weights))

    def _after_module_injection(self, config: TrainableTokensConfig, adapter_name: str, module_targets: list[str]) -> None:
        """With tied embeddings, the output layer follows the embedding's trained rows: it gets a layer tied to the
        embedding's (replacing one of its own, if it was targeted too)."""
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        tied_config = getattr(getattr(self.model, "config", None), "tie_word_embeddings", False)
        if not tied_config or not isinstance(embedding, TrainableTokensLayer):
            return
        weight = embedding.get_base_layer().weight
        for name, module in list(self.model.named_modules(remove_duplicate=False)):
            if module is embedding:
                continue
            if isinstance(module, TrainableTokensLayer):
                if module.tied_adapter is embedding or module.get_base_layer().weight is not weight:
                    continue
                base = module.get_base_layer()
            elif isinstance(module, nn.Linear) and module.weight is weight:
                base = module
            else:
                continue
            parent, _, target_name = self._get_submodules(name)
            setattr(parent, target_name, TrainableTokensLayer(base, adapter_name, tied_adapter=embedding))

    def _warn_tied_targets(self, targets: list[str]) -> None:
        """Tied layers are handled (they follow the embedding's rows), so there is nothing to warn about."""

    def _untie_targeted_embeddings(self) -> None:
        """Merging writes the same rows through both tied layers, so the weights stay tied."""
