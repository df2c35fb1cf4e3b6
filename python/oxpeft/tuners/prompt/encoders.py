"""The modules that produce virtual tokens: `PromptEmbedding`, `PromptEncoder` (P-tuning) and `PrefixEncoder`.

Each holds an `embedding` with one row per virtual token. What PEFT saves is the encoder's OUTPUT for all virtual
tokens (`prompt_embeddings`); a model loaded for inference keeps only that output, as the `embedding`'s weight,
and skips the reparametrisation. Parameter names follow PEFT's (`embedding`, `mlp_head`, `lstm_head`,
`transform`) so that state dicts of whole models line up too.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from oxpeft.tuners.prompt.config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)


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


class PromptEmbedding(VirtualTokenEncoder):
    """Prompt tuning: the virtual tokens are free embeddings of the model's width."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module | None) -> None:
        super().__init__()
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init is PromptTuningInit.RANDOM:
            return  # a loaded adapter overwrites the weight; RANDOM keeps nn.Embedding's normal init
        if word_embeddings is None:
            raise ValueError(
                f"prompt_tuning_init={config.prompt_tuning_init.value} needs the model's input embeddings, "
                "but the model has no get_input_embeddings()"
            )
        vocab_size = word_embeddings.weight.shape[0]
        if config.prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB:
            token_ids = torch.randint(0, vocab_size, (total,), dtype=torch.long)
        else:
            token_ids = _init_text_token_ids(config, total, vocab_size)
        with torch.no_grad():
            init = word_embeddings(token_ids.to(word_embeddings.weight.device)).detach().to(torch.float32)
        self.embedding.weight = nn.Parameter(init.clone())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _init_text_token_ids(config: PromptTuningConfig, total: int, vocab_size: int) -> torch.Tensor:
    """Token ids of the init text, repeated (or cut) to exactly `total` ids."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    if kwargs.pop("trust_remote_code", None):
        warnings.warn(
            "tokenizer_kwargs: trust_remote_code is ignored; remote tokenizer code is never run", stacklevel=4
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"prompt_tuning_init='TEXT': cannot load the tokenizer {config.tokenizer_name_or_path!r} ({exc})"
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenises to no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"the tokenizer {config.tokenizer_name_or_path!r} produced token ids {bad[:5]} outside the model's "
            f"vocabulary of {vocab_size}; is it the model's tokenizer?"
        )
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


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


def build_encoder(config: PromptLearningConfig, word_embeddings: nn.Module | None) -> VirtualTokenEncoder:
    """The encoder module of `config`'s method (its model-shape fields must be filled)."""
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, word_embeddings)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config)
    raise ValueError(f"no prompt encoder for {type(config).__name__}")
