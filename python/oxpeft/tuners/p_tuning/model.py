"""`PromptEncoder`: the P-tuning encoder (an MLP or a bidirectional LSTM over virtual-token embeddings)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from oxpeft.tuners.prompt_learning_utils import VirtualTokenEncoder
from oxpeft.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(VirtualTokenEncoder):
    """P-tuning: embeddings reparametrised by an MLP, or by a bidirectional LSTM followed by an MLP."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        self._reparametrised = not config.inference_mode
        if not self._reparametrised:
            return
        if self.encoder_type is PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "PromptEncoderConfig: encoder_num_layers only applies to the LSTM encoder; the MLP encoder "
                    "always has 3 linear layers",
                    stacklevel=4,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    @property
    def reparametrised(self) -> bool:
        return self._reparametrised

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if not self._reparametrised:
            return embeds
        if self.encoder_type is PromptEncoderReparameterizationType.LSTM:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)
