"""Trainable tokens (`TrainableTokensConfig`, and LoRA's `trainable_token_indices`) against the real peft: files
both ways, outputs, tied embeddings, merges."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import oxpeft


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 7, 3, 9, 1]])


def _train(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_tokens_train_only_their_rows_and_move_both_ways(tied, tmp_path):
    base = _llama(tied)
    model = oxpeft.get_peft_model(copy.deepcopy(base), oxpeft.TrainableTokensConfig(token_indices=[1, 5, 7]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.model.embed_tokens.trainable_tokens_delta.default"]
    torch.testing.assert_close(model(IDS).logits, base(IDS).logits)  # a no-op until trained
    before = base.model.embed_tokens.weight.detach().clone()
    _train(model)
    want = model(IDS).logits
    assert not torch.allclose(want, base(IDS).logits)
    torch.testing.assert_close(model.base_model.model.model.embed_tokens.get_base_layer().weight, before)
    model.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    expected = {"base_model.model.model.embed_tokens.trainable_tokens_delta"}
    if tied:  # PEFT saves the tied output layer's (shared) rows too
        expected.add("base_model.model.lm_head.trainable_tokens_delta")
    assert keys == expected

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, want)
    theirs.save_pretrained(tmp_path / "peft")
    back = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(back(IDS).logits, want)

    merged = back.merge_and_unload()
    torch.testing.assert_close(merged(IDS).logits, want)
    if tied:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
    rows = merged.model.embed_tokens.weight[[1, 5, 7]]
    assert not torch.equal(rows, before[[1, 5, 7]])
    assert torch.equal(merged.model.embed_tokens.weight[[0, 2]], before[[0, 2]])


def test_peft_trainable_tokens_file_loads_with_equal_outputs(tmp_path):
    base = _llama(True)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=[2, 4], init_weights=False))
    theirs.save_pretrained(tmp_path / "p")
    ours = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(ours(IDS).logits, theirs.eval()(IDS).logits)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(IDS).logits, base(IDS).logits)
    ours.merge_adapter()
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.model.model.embed_tokens.get_base_layer().weight, base.model.embed_tokens.weight)


def test_bad_token_indices_are_refused_before_anything_changes():
    base = _llama(False)
    for bad in ([1, 1], [-1], ["a"]):
        with pytest.raises(ValueError, match="token_indices"):
            oxpeft.TrainableTokensConfig(token_indices=bad)
    with pytest.raises(ValueError, match="token_indices is empty"):
        oxpeft.get_peft_model(copy.deepcopy(base), oxpeft.TrainableTokensConfig())
    with pytest.raises(ValueError, match="outside the embedding's 100 rows"):
        oxpeft.get_peft_model(base, oxpeft.TrainableTokensConfig(token_indices=[3, 150]))
    assert not any("trainable" in n for n, _ in base.named_parameters())


def test_two_adapters_with_overlapping_rows_cannot_run_together():
    model = oxpeft.get_peft_model(_llama(False), oxpeft.TrainableTokensConfig(token_indices=[1, 2], init_weights=False))
    model.add_adapter("b", oxpeft.TrainableTokensConfig(token_indices=[2, 3], init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="disjunct"):
        model(IDS)


@pytest.mark.parametrize("tied", [True, False])
def test_lora_with_trainable_token_indices_matches_peft_both_ways(tied, tmp_path):
    """TRL's added-token path: LoRA plus a few trainable embedding rows; PEFT's keys (`token_adapter.`), the tied
    output layer following the rows, equal outputs and merges both ways."""
    base = _llama(tied)
    config = dict(r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 5, 7])
    model = oxpeft.get_peft_model(copy.deepcopy(base), oxpeft.LoraConfig(**config))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n for n in trainable) and any("lora_A" in n for n in trainable)
    _train(model)
    want = model(IDS).logits
    model.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert not any("lm_head" in k for k in keys)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, want)
    theirs.save_pretrained(tmp_path / "peft")
    assert set(load_file(tmp_path / "peft" / "adapter_model.safetensors")) == keys
    back = oxpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(back(IDS).logits, want)
    merged = back.merge_and_unload()
    torch.testing.assert_close(merged(IDS).logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged(IDS).logits, theirs.merge_and_unload()(IDS).logits, rtol=0, atol=1e-5)


def test_trainable_token_indices_per_layer_and_conflicts():
    base = _llama(False)
    model = oxpeft.get_peft_model(
        copy.deepcopy(base), oxpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3]})
    )
    assert isinstance(model.base_model.model.model.embed_tokens, oxpeft.tuners.trainable_tokens.TrainableTokensLayer)
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        oxpeft.get_peft_model(
            copy.deepcopy(base),
            oxpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3]}, modules_to_save=["embed_tokens"]),
        )
    with pytest.raises(ValueError, match="matches no module"):
        oxpeft.get_peft_model(copy.deepcopy(base), oxpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"nope": [3]}))


@pytest.mark.parametrize("kind", ["trainable_tokens", "lora"])
def test_oxpeft_merge_writes_the_rows_and_unmerges_exactly(kind, tmp_path):
    """`oxpeft merge` of trainable-token rows (alone, and beside LoRA) equals PEFT's merge_and_unload; the unmerge
    gives the checkpoint back byte for byte."""
    from transformers import AutoModelForCausalLM

    from test_cli import run as run_oxpeft

    base = _llama(True).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    config = (
        oxpeft.TrainableTokensConfig(token_indices=[1, 5, 7])
        if kind == "trainable_tokens"
        else oxpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7])
    )
    model = _train(oxpeft.get_peft_model(copy.deepcopy(base).float(), config))
    model.save_pretrained(tmp_path / "adapter")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").merge_and_unload()
    merged = tmp_path / "merged"
    done = run_oxpeft("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(merged), "-q")
    assert done.returncode == 0, done.stderr
    offline = AutoModelForCausalLM.from_pretrained(merged).eval()
    for (name, p), (_, q) in zip(offline.named_parameters(), theirs.named_parameters()):
        if name.endswith("embed_tokens.weight"):
            assert torch.equal(p, q), name  # rows are copied, not computed: bit-identical to PEFT's merge
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-2, msg=name)  # bf16, one rounding vs PEFT's
    back = tmp_path / "back"
    done = run_oxpeft("unmerge", str(merged), str(tmp_path / "adapter"), "-o", str(back), "-q")
    assert done.returncode == 0, done.stderr
    assert (back / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors").read_bytes()


def test_ensure_weight_tying_with_trainable_tokens():
    from oxpeft.tuners.trainable_tokens import TrainableTokensLayer

    lora = dict(r=2, target_modules=["q_proj"], ensure_weight_tying=True)
    # Tied model, the same rows named for both layers: the output layer follows the embedding's rows.
    model = oxpeft.get_peft_model(
        _llama(True), oxpeft.LoraConfig(**lora, trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 2]})
    )
    head = model.base_model.model.lm_head
    assert isinstance(head, TrainableTokensLayer) and head.tied_adapter is model.base_model.model.model.embed_tokens
    # Different rows for tied layers cannot be tied.
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        oxpeft.get_peft_model(
            _llama(True), oxpeft.LoraConfig(**lora, trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]})
        )
    # Without ensure_weight_tying each layer trains its own rows, as in PEFT.
    model = oxpeft.get_peft_model(
        _llama(True),
        oxpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]}),
    )
    assert model.base_model.model.lm_head.tied_adapter is None
    with pytest.warns(UserWarning, match="does not have tied weights"):
        oxpeft.get_peft_model(_llama(False), oxpeft.LoraConfig(**lora, trainable_token_indices=[1]))
    # LoRA on the tied embedding with ensure_weight_tying: test_lora_tying.py.
