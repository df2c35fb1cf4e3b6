"""PiSSA / OLoRA adapters saved as plain LoRA for the original base (path_initial_model_for_weight_conversion)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import oxpeft
from conftest import logits, make_llama, twin

peft = pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")

TARGETS = ["q_proj", "v_proj"]


def _train(model, seed: int) -> None:
    """Stand-in for training: move every trainable adapter weight."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(
    "init, extra",
    [
        ("pissa", {}),
        ("olora", {}),
        ("pissa", {"use_rslora": True}),
        ("pissa", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 12}}),
        ("pissa", {"target_modules": [*TARGETS, "embed_tokens"]}),
    ],
)
def test_converted_adapter_runs_on_the_original_base_and_matches_peft(init, extra, tmp_path):
    base = make_llama()
    x = torch.randint(0, 256, (2, 9))
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    config.update(extra)
    model = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(**config))
    model.save_pretrained(tmp_path / "init")
    _train(model, 1)
    trained = logits(model, x)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")

    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True

    # Loaded on the untouched base, by HF PEFT and by oxpeft, it gives the trained model's outputs.
    for loader in (peft.PeftModel, oxpeft.PeftModel):
        converted = loader.from_pretrained(twin(base), str(tmp_path / "lora")).eval()
        torch.testing.assert_close(logits(converted, x), trained, atol=2e-4, rtol=1e-4)

    # HF PEFT converting the same trained and initial weights writes the same tensors and config. (It drops
    # every tensor but lora_A / lora_B, so an embedding adapter would be lost: oxpeft converts those too.)
    if "embed_tokens" in config["target_modules"]:
        return
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(**config))
    peft.set_peft_model_state_dict(theirs, oxpeft.get_peft_model_state_dict(model))
    theirs.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours_t = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    theirs_t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_t.keys() == theirs_t.keys()
    for k in ours_t:
        torch.testing.assert_close(ours_t[k], theirs_t[k], atol=0, rtol=0)
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert saved[key] == pytest.approx(theirs_cfg[key]), key


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    base = make_llama()
    dora = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights="pissa"))
    dora.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="DoRA"):
        dora.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()

    plain = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    other = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    other.save_pretrained(tmp_path / "other-init")
    with pytest.raises(ValueError, match="initial adapter has no tensor"):
        plain.save_pretrained(tmp_path / "out2", path_initial_model_for_weight_conversion=tmp_path / "other-init")
    with pytest.raises(FileNotFoundError):
        plain.save_pretrained(tmp_path / "out3", path_initial_model_for_weight_conversion=tmp_path / "missing")
