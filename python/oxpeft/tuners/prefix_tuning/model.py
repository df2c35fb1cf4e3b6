"""`PrefixEncoder`: the prefix-tuning encoder (learned keys and values, optionally through an MLP)."""

from __future__ import annotations


import torch
from torch import nn

from oxpeft.tuners.prompt_learning_utils import VirtualTokenEncoder
from oxpeft.tuners.prefix_tuning.config import PrefixTuningConfig


class PrefixEncoder(VirtualTokenEncoder):
    """Prefix tuning: per virtual token, the keys and values of every layer (num_layers * 2 * token_dim values)."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def reparametrised(self) -> bool:
        return self.prefix_projection

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        return self.transform(embeds) if self.prefix_projection else embeds
