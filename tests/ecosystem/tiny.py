"""The tiny model, tokenizer and data every ecosystem script uses (nothing is downloaded).

Run by the scripts next to this file, in processes whose `import peft` is oxpeft (the alias) or the real peft."""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256
IDS = torch.arange(24).reshape(2, 12) * 7 % 250  # fixed probe input for logits


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=251, eos_token_id=252, bos_token_id=253,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(250)}
    vocab.update({"<unk>": 250, "<pad>": 251, "<eos>": 252, "<bos>": 253})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def text_dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j * 3) % 250}" for j in range(10)) for i in range(n)]})


def token_dataset(n: int = 16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (n, 12), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * n, "labels": ids.tolist()})


@torch.no_grad()
def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    return model(input_ids=IDS if ids is None else ids).logits.float()


def files(folder: str) -> dict[str, list[str]]:
    """Every folder under `folder` (relative) -> its file names."""
    out = {}
    for root, _, names in os.walk(folder):
        out[os.path.relpath(root, folder)] = sorted(names)
    return out


def report(path: str, **values) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=1, default=str)


def which_peft() -> str:
    import peft

    return "oxpeft" if getattr(peft, "__oxpeft__", False) else "peft"


def args() -> list[str]:
    return sys.argv[1:]
