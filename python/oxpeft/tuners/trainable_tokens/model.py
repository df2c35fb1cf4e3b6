"""`TrainableTokensModel`: puts TrainableTokensLayers on the target embeddings, and on the layers tied to them."""

from __future__ import annotations

from torch import nn

from oxpeft.tuners.trainable_tokens.config import TrainableTokensConfig
from oxpeft.tuners.trainable_tokens.layer import TrainableTokensLayer, TrainableTokensWrapper
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


def output_layers_tied_to_embedding(model: nn.Module) -> list[str]:
    """Names of the Linear layers that share the input embedding's weight (a tied output layer)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        return []
    weight = getattr(embedding, "get_base_layer", lambda: embedding)().weight
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight is weight
    ]


def add_token_rows(
    tuner: BaseTuner, adapter_name: str, key: str, indices: list[int], init_weights: bool, *, auxiliary: bool
) -> None:
    """Adapter `adapter_name` trains rows `indices` of the embedding `key`: a TrainableTokensLayer there (or the
    adapter added to the one already there). `auxiliary`: beside another method's adapter (LoRA's
    `trainable_token_indices`), saved under PEFT's `<layer>.token_adapter.` keys."""
    if not indices:
        raise ValueError(f"trainable tokens for '{key}': token_indices is empty, so there is nothing to train")
    parent, target, target_name = tuner._get_submodules(key)
    dtype = tuner._adapter_dtype(target.get_base_layer() if isinstance(target, TrainableTokensLayer) else target)
    if isinstance(target, TrainableTokensLayer):
        target.update_layer(adapter_name, indices, init_weights, dtype)
        target.set_adapter(target.active_adapters + [adapter_name])
        return
    layer_cls = TrainableTokensWrapper if auxiliary else TrainableTokensLayer
    layer = layer_cls(target, adapter_name, indices, init_weights, adapter_dtype=dtype)
    setattr(parent, target_name, layer)


def tie_output_layers(tuner: BaseTuner, adapter_name: str, *, auxiliary: bool) -> None:
    """With tied embeddings (`tie_word_embeddings`), the layers that share the input embedding's weight (the
    output layer) get a TrainableTokensLayer tied to the embedding's, so they use the same trained rows; one that
    was given rows of its own is replaced by a tied one. PEFT saves a tied layer's rows for the trainable-tokens
    method, not beside LoRA."""
    model = tuner.model
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    if not isinstance(embedding, TrainableTokensLayer):
        return
    weight = embedding.get_base_layer().weight
    for name, module in list(model.named_modules(remove_duplicate=False)):
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
        parent, _, target_name = tuner._get_submodules(name)
        layer = (TrainableTokensWrapper if auxiliary else TrainableTokensLayer)(base, adapter_name, tied_adapter=embedding)
        layer.saves_tensors = not auxiliary  # PEFT saves a tied layer's rows for the method, not beside LoRA
        setattr(parent, target_name, layer)


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
        add_token_rows(self, adapter_name, current_key, config.token_indices, config.init_weights, auxiliary=False)

    def _after_module_injection(self, config: TrainableTokensConfig, adapter_name: str, module_targets: list[str]) -> None:
        tie_output_layers(self, adapter_name, auxiliary=False)

    def _warn_tied_targets(self, targets: list[str]) -> None:
        """Tied layers are handled (they follow the embedding's rows), so there is nothing to warn about."""
