"""LoRA with `ensure_weight_tying=True` on a model whose output layer shares the input embedding's weight.

The adapter goes on the input embedding (whichever of the two the config names), and each tied output layer gets a
LoRA layer whose factors *are* the embedding adapter's, transposed: lora_A = lora_embedding_B^T and
lora_B = lora_embedding_A^T, with the embedding's scaling. Both layers then add the same delta to the one shared
weight, so the model stays tied through training (one set of trained weights, no duplicate parameters for the
optimiser), merging (the delta is added once, and the output layer keeps sharing the merged weight) and saving
(PEFT's keys: the output layer's factors are written out as PEFT writes them, and ignored on load since they are
the embedding's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TiedFactor(nn.Module):
    """A LoRA factor of a tied output layer: the embedding adapter's `container[adapter]`, transposed."""

    def __init__(self, source: nn.Module, adapter_name: str, container: str) -> None:
        super().__init__()
        object.__setattr__(self, "_source", source)  # not a child module: the embedding layer lives elsewhere
        self._adapter_name, self._container = adapter_name, container
        self._register_state_dict_hook(_write_weight)
        self._register_load_state_dict_pre_hook(_skip_weight)

    bias = None  # as a bias-free nn.Linear factor

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._source, self._container)[self._adapter_name].t()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            return  # a file's copy (low_cpu_mem_usage loading): the embedding's factor already holds it
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"tied to {self._container}[{self._adapter_name!r}] transposed, shape {tuple(self.weight.shape)}"


def _write_weight(module: TiedFactor, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict[prefix + "weight"] = module.weight.detach()


def _skip_weight(state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + "weight", None)


def tie_to_embedding(layer: nn.Module, embedding_layer: nn.Module, adapter_name: str) -> None:
    """Make adapter `adapter_name` of the LoRA Linear `layer` (a tied output layer) the embedding's, transposed."""
    if adapter_name not in getattr(embedding_layer, "lora_embedding_A", {}):
        raise ValueError(f"ensure_weight_tying: the input embedding has no LoRA adapter '{adapter_name}' to tie to")
    layer.lora_A[adapter_name] = TiedFactor(embedding_layer, adapter_name, "lora_embedding_B")
    layer.lora_B[adapter_name] = TiedFactor(embedding_layer, adapter_name, "lora_embedding_A")
    layer.r[adapter_name] = embedding_layer.r[adapter_name]
    layer.lora_alpha[adapter_name] = embedding_layer.lora_alpha[adapter_name]
    layer.scaling[adapter_name] = embedding_layer.scaling[adapter_name]
    layer._tied_sources[adapter_name] = embedding_layer
    embedding_layer._tied_adapters.add(adapter_name)
