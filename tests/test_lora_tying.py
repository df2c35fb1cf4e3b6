"""LoRA with ensure_weight_tying=True on a tied model: the adapter sits on the input embedding and the tied output
layer shares it (its factors are the embedding's, transposed). Checked against the real peft: the targets it
rewrites, outputs, files both ways; and what PEFT 0.21.2 gets wrong: its merge adds the shared delta twice, while
oxpeft's merged model equals the unmerged one and stays tied."""

from __future__ import annotations

import pytest
import torch

import oxpeft
from conftest import make_llama, twin

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

TARGETS = [["embed_tokens", "q_proj"], ["lm_head"], r".*(q_proj|lm_head)"]


def _tied_model(lib, base, targets, **kwargs):
    model = lib.get_peft_model(twin(base), lib.LoraConfig(target_modules=targets, ensure_weight_tying=True, **kwargs))
    torch.manual_seed(1)
    with torch.no_grad():  # the same values in both libraries (the output layer's factors follow the embedding's)
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name and "lm_head" not in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("targets", TARGETS, ids=["embedding", "output-layer", "regex"])
def test_outputs_and_files_equal_peft_both_ways(tmp_path, targets):
    base = make_llama(tie_word_embeddings=True)
    ids = torch.randint(0, 100, (2, 7))
    ours, theirs = _tied_model(oxpeft, base, targets), _tied_model(peft, base, targets)
    head = ours.base_model.model.lm_head
    assert isinstance(head, oxpeft.tuners.lora.LoraLayer) and not list(head.lora_A.parameters())
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, peft_file = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine.keys() == peft_file.keys() and any(k.startswith("base_model.model.lm_head.lora_A") for k in mine)
    for key, value in peft_file.items():
        torch.testing.assert_close(mine[key], value, msg=key)
    for loaded in (
        oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "theirs"),
        oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "theirs", low_cpu_mem_usage=True),
        peft.PeftModel.from_pretrained(twin(base), tmp_path / "ours"),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected)


def test_training_merging_and_unmerging_keep_the_tie():
    base = make_llama(tie_word_embeddings=True)
    ids = torch.randint(0, 100, (2, 7))
    model = _tied_model(oxpeft, base, ["embed_tokens", "q_proj"])
    embedding, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    # One set of trained weights: the optimiser sees the embedding's factors only, and both layers follow them.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert torch.equal(head.lora_A["default"].weight, embedding.lora_embedding_B["default"].t())
    with torch.no_grad():
        unmerged = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embedding.get_base_layer().weight, base.model.embed_tokens.weight)
        merged = model.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_peft_merge_adds_the_shared_delta_twice():
    """The difference above, shown on the real peft (0.21.2): its merged model is not the model it merged."""
    base = make_llama(tie_word_embeddings=True)
    ids = torch.randint(0, 100, (2, 7))
    theirs = _tied_model(peft, base, ["embed_tokens"])
    with torch.no_grad():
        before = theirs(ids).logits
        after = theirs.merge_and_unload()(ids).logits
    assert (after - before).abs().max() > 1e-2


@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_modules_to_save_share_one_trained_copy_like_peft(tmp_path, saved):
    """The tied embedding in modules_to_save: the output layer's trained copy shares the embedding copy's weight."""
    base = make_llama(tie_word_embeddings=True)
    ids = torch.randint(0, 100, (2, 7))
    models = {}
    for lib in (oxpeft, peft):
        model = lib.get_peft_model(twin(base), lib.LoraConfig(
            target_modules=["q_proj"], modules_to_save=[saved], ensure_weight_tying=True, init_lora_weights=False))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "modules_to_save" in name and "embed_tokens" in name:
                    p.add_(torch.randn_like(p) * 0.1)
                elif "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        models[lib.__name__] = model
    ours, theirs = models["oxpeft"], models["peft"]
    assert ours.peft_config["default"].modules_to_save == theirs.peft_config["default"].modules_to_save
    head, embedding = ours.base_model.model.lm_head, ours.base_model.model.model.embed_tokens
    assert head.modules_to_save["default"].weight is embedding.modules_to_save["default"].weight
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, peft_file = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine.keys() == peft_file.keys()
    for loaded in (oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "theirs"),
                   peft.PeftModel.from_pretrained(twin(base), tmp_path / "ours")):
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected)
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_what_cannot_be_tied():
    with pytest.raises(ValueError, match="cannot tie DoRA"):
        oxpeft.get_peft_model(make_llama(tie_word_embeddings=True), oxpeft.LoraConfig(
            target_modules=["embed_tokens"], ensure_weight_tying=True, use_dora=True))
    with pytest.warns(UserWarning, match="no tied modules were found"):
        oxpeft.get_peft_model(make_llama(tie_word_embeddings=False), oxpeft.LoraConfig(
            target_modules=["embed_tokens"], ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="no tied modules are added"):
        oxpeft.get_peft_model(make_llama(tie_word_embeddings=True), oxpeft.LoraConfig(
            target_modules=["q_proj"], ensure_weight_tying=True))


def test_oxpeft_merge_of_a_tied_adapter_into_a_tied_checkpoint(tmp_path):
    """The checkpoint stores the shared weight once (as the embedding): the embedding's delta is the whole merge."""
    import warnings

    from transformers import AutoModelForCausalLM

    from test_checkpoint_merge import sha_per_tensor

    base = make_llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    model = _tied_model(oxpeft, base, ["embed_tokens", "q_proj"])
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the merged model differs" warning: it does not
        oxpeft.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    oxpeft.unmerge_checkpoint(tmp_path / "merged", tmp_path / "adapter", tmp_path / "back", progress=False)
    assert sha_per_tensor(tmp_path / "back") == sha_per_tensor(tmp_path / "base")


def test_oxpeft_merge_of_a_tied_modules_to_save_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    model = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(
        target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True, init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.05)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    oxpeft.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
