"""Shared fixtures: tiny transformers models built from configs (nothing is downloaded)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")


# The tiny Llama every test builds from a config (nothing is downloaded).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)


def assert_saved_like_peft(ours: "os.PathLike", theirs: "os.PathLike", normalise=None) -> None:
    """oxpeft's saved adapter folder holds what PEFT's does: the same tensor keys and shapes (safetensors
    metadata {"format": "pt"}), the same config keys and values, except that oxpeft signs `peft_version`
    (the release, with oxpeft's version as a local label). `normalise(config)` evens out known differences."""
    import json

    from safetensors import safe_open

    import oxpeft

    def tensors(folder):
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert tensors(ours) == tensors(theirs)
    configs = [json.loads(open(os.path.join(d, "adapter_config.json"), encoding="utf-8").read()) for d in (ours, theirs)]
    for data in configs:
        for key, value in data.items():
            if isinstance(value, list):
                data[key] = sorted(value, key=repr)
        if normalise is not None:
            normalise(data)
    mine, peft_wrote = configs
    assert mine.pop("peft_version") == f"{peft_wrote.pop('peft_version')}+oxpeft.{oxpeft.__version__}"
    assert mine == peft_wrote


def make_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def make_bert_seq_cls(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


MODEL_FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_seq_cls}


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def input_ids():
    torch.manual_seed(1234)
    return torch.randint(0, 256, (2, 12))


class TwoLinears(torch.nn.Module):
    """Linear 10 -> 20 -> 6 (the forward), and an embedding beside them (for refusals of Linear-only variants)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.lin1 = torch.nn.Linear(20, 6)
        self.emb = torch.nn.Embedding(9, 10)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def two_linears() -> TwoLinears:
    torch.manual_seed(0)
    return TwoLinears()


def twin(model):
    """An independent copy with identical weights (one per framework under test)."""
    return copy.deepcopy(model)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits
