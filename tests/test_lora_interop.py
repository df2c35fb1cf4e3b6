"""LoRA adapters move both ways between oxpeft and the real HF PEFT with equal outputs."""

from __future__ import annotations

import json

import pytest
import torch

import oxpeft
from conftest import MODEL_FACTORIES, assert_saved_like_peft, logits, twin

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")

ATOL = 1e-5

CASES = {
    "llama-plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"])),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"v_proj": 3, "up_proj": 32},
        ),
    ),
    "llama-modules-to-save": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "llama-embedding": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "llama-all-linear": ("llama", dict(r=4, target_modules="all-linear")),
    "llama-layers": ("llama", dict(r=4, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-all-linear-dora": ("gpt2", dict(r=4, target_modules="all-linear", use_dora=True, fan_in_fan_out=True)),
    "gpt2-lora-bias": ("gpt2", dict(r=4, target_modules=["c_proj"], lora_bias=True, fan_in_fan_out=True)),
    "bert-seqcls": ("bert", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bert-all-linear-dora": ("bert", dict(r=4, target_modules="all-linear", use_dora=True, task_type="SEQ_CLS")),
}


def _input(model_kind: str) -> torch.Tensor:
    torch.manual_seed(99)
    return torch.randint(0, 256, (2, 10))


def _with_random_init(kwargs: dict) -> dict:
    # init_lora_weights=False leaves A and B random, so the adapter really changes the outputs.
    return dict(kwargs, init_lora_weights=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_oxpeft_adapter_loads_in_peft(case, tmp_path):
    kind, kwargs = CASES[case]
    base = MODEL_FACTORIES[kind]()
    x = _input(kind)
    torch.manual_seed(7)
    ours = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(**_with_random_init(kwargs)))
    ours.eval()
    expected = logits(ours, x)
    assert not torch.allclose(expected, logits(base, x)), "the adapter must change the output"
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    torch.testing.assert_close(logits(theirs, x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_oxpeft(case, tmp_path):
    kind, kwargs = CASES[case]
    base = MODEL_FACTORIES[kind]()
    x = _input(kind)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(**_with_random_init(kwargs)))
    theirs.eval()
    expected = logits(theirs, x)
    theirs.save_pretrained(tmp_path)

    ours = oxpeft.PeftModel.from_pretrained(twin(base), str(tmp_path))
    torch.testing.assert_close(logits(ours, x), expected, atol=ATOL, rtol=0)

    merged = ours.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, x), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama-plain", "llama-dora", "llama-modules-to-save", "bert-seqcls", "gpt2-conv1d"])
def test_saved_files_match_peft(case, tmp_path):
    """Same tensor keys and shapes, same config keys and values as HF PEFT writes for the same config."""
    kind, kwargs = CASES[case]
    base = MODEL_FACTORIES[kind]()
    oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(twin(base), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "theirs")

    assert_saved_like_peft(tmp_path / "ours", tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours["inference_mode"] is True


def test_merged_equals_unmerged_all_dtypes():
    base = MODEL_FACTORIES["llama"]()
    x = _input("llama")
    torch.manual_seed(3)
    model = oxpeft.get_peft_model(base, oxpeft.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    expected = logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), expected, atol=ATOL, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, x), expected, atol=ATOL, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), logits(MODEL_FACTORIES["llama"](), x))
