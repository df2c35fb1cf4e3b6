"""`VirtualTokenEncoder`: the base of the modules that produce virtual tokens (`PromptEmbedding`,
`PromptEncoder` for P-tuning, `PrefixEncoder`).

Each holds an `embedding` with one row per virtual token. What PEFT saves is the encoder's OUTPUT for all virtual
tokens (`prompt_embeddings`); a model loaded for inference keeps only that output, as the `embedding`'s weight,
and skips the reparametrisation. Parameter names follow PEFT's (`embedding`, `mlp_head`, `lstm_head`,
`transform`) so that state dicts of whole models line up too.
"""

from __future__ import annotations

import torch
from torch import nn


class VirtualTokenEncoder(nn.Module):
    """Base: maps virtual-token indices to embeddings; `reparametrised` encoders run more than a lookup."""

    embedding: nn.Embedding

    @property
    def reparametrised(self) -> bool:
        return False

    def output(self, num_tokens: int) -> torch.Tensor:
        """The encoder's output for the first `num_tokens` virtual tokens, shape (num_tokens, dim)."""
        if not self.reparametrised:
            return self.embedding.weight[:num_tokens]
        indices = torch.arange(num_tokens, device=self.embedding.weight.device).unsqueeze(0)
        return self(indices)[0]

    def load_output(self, value: torch.Tensor) -> None:
        """Copy a saved output (PEFT's `prompt_embeddings`) into `embedding`; only valid when not `reparametrised`
        (save_load checks that, and the shape, before anything is written)."""
        with torch.no_grad():
            weight = self.embedding.weight
            weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
