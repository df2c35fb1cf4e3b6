"""`PromptEmbedding`: the prompt-tuning encoder, free embeddings of the model's width."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from oxpeft.tuners.prompt_learning_utils import VirtualTokenEncoder
from oxpeft.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit


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
