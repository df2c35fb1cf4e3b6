"""`TrainableTokensLayer`: an embedding (or a tied output layer) whose listed rows are replaced by trained ones.

Each adapter keeps its rows (`trainable_tokens_delta`, saved) and the base's rows they replace
(`trainable_tokens_original`, not saved). The forward builds the weight with the active adapters' rows written in
(`index_copy`, so gradients reach only those rows) and runs the embedding or linear map with it; merging writes the
rows into the base weight, unmerging writes the originals back (exactly: rows are copied, not added).

A layer tied to another (the output layer of a model with tied embeddings) holds no rows of its own: it uses
those of the layer it is tied to, so the two always agree.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.tuners._buffer_dict import BufferDict
from oxpeft.tuners.tuners_utils import _ADAPTERS_ON_META, BaseTunerLayer, check_merged_weight


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")
    keeps_tying = True

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        token_indices: list[int] | None = None,
        init_weights: bool = True,
        tied_adapter: TrainableTokensLayer | None = None,
        auxiliary: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        # In a list, so that the tied layer is not a submodule (its rows are saved once, under its own name).
        self._tied = [tied_adapter] if tied_adapter is not None else []
        # Beside another method (LoRA's trainable_token_indices) the rows sit in a `token_adapter` child, where
        # PEFT's wrapper has them: `emb.token_adapter.trainable_tokens_delta` in state dicts, files and code.
        holder: nn.Module = self
        if auxiliary:
            self.token_adapter = nn.Module()
            holder = self.token_adapter
            self.file_key_infix = "token_adapter."
        if tied_adapter is not None:
            holder.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            holder.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        else:
            holder.trainable_tokens_delta = nn.ParameterDict()
            holder.trainable_tokens_original = BufferDict(persistent=False)
            self.token_indices: dict[str, list[int]] = {}
        base = self.get_base_layer()
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ValueError(
                f"trainable tokens adapt an nn.Embedding (or an output nn.Linear tied to one), not {type(base).__name__}"
            )
        # PEFT's: (rows, width) for an embedding, (in, out) for a linear layer.
        if isinstance(base, nn.Embedding):
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        if token_indices is not None:
            self.update_layer(adapter_name, token_indices, init_weights, adapter_dtype)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("trainable_tokens_delta", "trainable_tokens_original") and "token_adapter" in self._modules:
                return getattr(self._modules["token_adapter"], name)
            raise

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        return self._tied[0] if self._tied else None

    def update_layer(
        self,
        adapter_name: str,
        token_indices: list[int],
        init_weights: bool = True,
        adapter_dtype: torch.dtype | None = None,
        **_: Any,
    ) -> None:
        """Adapter `adapter_name` trains rows `token_indices`, held in `adapter_dtype` (default: the weight's)."""
        if self.tied_adapter is not None:
            return  # the rows are the tied layer's
        weight = self.get_base_layer().weight
        rows = weight.shape[0]
        outside = [i for i in token_indices if i >= rows]
        if outside:
            raise ValueError(
                f"token indices {outside[:5]} are outside the embedding's {rows} rows; resize the embeddings "
                "(model.resize_token_embeddings) before adding the adapter"
            )
        index = torch.tensor(token_indices, device=weight.device)
        originals = weight.detach()[index].clone()
        if _ADAPTERS_ON_META.get():  # low_cpu_mem_usage: a file's rows are assigned to it
            values = torch.empty(originals.shape, device="meta", dtype=adapter_dtype or originals.dtype)
        else:
            values = originals.clone() if init_weights else torch.randn_like(originals)
        if adapter_dtype is not None:
            values = values.to(adapter_dtype)
        self.token_indices[adapter_name] = list(token_indices)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals

    # --- forward -------------------------------------------------------------------------------------------------
    def _check_disjoint(self, adapter_names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + adapter_names):
            indices = set(self.token_indices[name])
            if seen & indices:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported."
                )
            seen |= indices

    def get_merged_weights(self, adapter_names: list[str]) -> torch.Tensor:
        """The base weight with the rows of `adapter_names` written in (a new tensor, differentiable in the rows)."""
        weight = self.get_base_layer().weight
        for name in adapter_names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def forward_adapters(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        names = [n for n in adapter_names if n in self.trainable_tokens_delta]
        if self.disable_adapters or not names:
            if self.merged and self.disable_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(names)
        weight = self.get_merged_weights(names)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma 3) apply it in their forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, weight, base.bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)

    # --- merging -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        self._check_disjoint(names)
        base = self.get_base_layer()
        merged = base.weight.data
        for name in names:
            index = torch.tensor(self.token_indices[name], device=merged.device)
            merged = merged.index_copy(0, index, self.trainable_tokens_delta[name].to(merged))
            if safe_merge:
                check_merged_weight(merged, name)
        base.weight.data = merged
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight.data.index_copy_(0, index, self.trainable_tokens_original[name].to(weight))


class TrainableTokensWrapper(TrainableTokensLayer):
    """Trainable token rows beside another method's adapter (LoRA's `trainable_token_indices`), held in a
    `token_adapter` child as in PEFT's class of this name, which code written for PEFT looks for."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        kwargs["auxiliary"] = True
        super().__init__(base_layer, adapter_name, *args, **kwargs)
