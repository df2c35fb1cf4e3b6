"""LoRA behaviour beyond interop: training, errors that change nothing, tied embeddings, init methods."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import oxpeft
from conftest import logits, make_gpt2, make_llama, twin


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_lowers_loss_and_only_adapters_change(input_ids):
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    before = _state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(25):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in changed if "lora_B" in k}, "B starts at zero and must move"


def test_every_misspelt_target_is_named():
    model = make_llama()
    before = _state(model)
    with pytest.raises(ValueError) as err:
        oxpeft.get_peft_model(model, oxpeft.LoraConfig(target_modules=["q_proj", "v_prj", "gate_prj"]))
    msg = str(err.value)
    assert "'v_prj'" in msg and "'v_proj'" in msg and "'gate_prj'" in msg and "'gate_proj'" in msg
    assert "q_proj'" not in msg.split("closest")[0]
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_regex_that_matches_nothing_says_so():
    with pytest.raises(ValueError, match="matches no module name .*WHOLE"):
        oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(target_modules=r"q_proj"))
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(target_modules=r".*\.(q|v)_proj"))
    assert len([m for m in model.modules() if isinstance(m, oxpeft.tuners.lora.Linear)]) == 4


def test_default_targets_come_from_the_architecture():
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig())
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="no default for model_type"):
        oxpeft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), oxpeft.LoraConfig())


def test_all_linear_skips_the_output_layer():
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in model.peft_config["default"].target_modules
    assert isinstance(model.get_base_model().lm_head, nn.Linear)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(bias="some"), "bias must be"),
        (dict(init_lora_weights="magic"), "init_lora_weights"),
        (dict(use_dora=True, lora_bias=True), "cannot be combined"),
        (dict(eva_config={"rho": 2.0}), "eva_config"),
        (dict(layers_pattern="layers"), "layers_to_transform"),
        (dict(modules_to_save="lm_head"), "list of module names"),
    ],
)
def test_bad_config_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oxpeft.LoraConfig(**kwargs)


def _saved_adapter(tmp_path, **kwargs):
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(r=4, init_lora_weights=False, **kwargs))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_wrong_shape_names_the_tensor_and_leaves_model_unchanged(tmp_path):
    path = _saved_adapter(tmp_path, target_modules=["q_proj", "v_proj"])
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(5, 64)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    base = make_llama()
    before = _state(base)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight' has shape \(5, 64\)"):
        oxpeft.PeftModel.from_pretrained(base, path)
    assert not any("lora" in n for n, _ in base.named_modules())
    assert set(base.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_missing_and_foreign_tensors_are_errors(tmp_path):
    path = _saved_adapter(tmp_path, target_modules=["q_proj"])
    tensors = load_file(path / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing from the file.*layers.1.*match no module.*layers.9"):
        oxpeft.PeftModel.from_pretrained(make_llama(), path)


def test_truncated_adapter_file_is_a_clear_error(tmp_path):
    path = _saved_adapter(tmp_path, target_modules=["q_proj"])
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        oxpeft.PeftModel.from_pretrained(make_llama(), path)


def test_config_of_another_model_or_method(tmp_path):
    path = _saved_adapter(tmp_path, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'q_proj'.*match no module|does not fit"):
        with pytest.warns(UserWarning):
            oxpeft.PeftModel.from_pretrained(make_gpt2(), path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_type"] = "BOFT"
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported peft_type 'BOFT'"):
        oxpeft.PeftModel.from_pretrained(make_llama(), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        oxpeft.PeftModel.from_pretrained(make_llama(), path)


def test_bin_adapter_is_read_weights_only(tmp_path, input_ids):
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    loaded = oxpeft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        oxpeft.PeftModel.from_pretrained(make_llama(), tmp_path)


def test_tied_embedding_target_warns_and_merge_stays_correct():
    base = make_gpt2()
    assert base.lm_head.weight is base.transformer.wte.weight
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="tied embeddings"):
        model = oxpeft.get_peft_model(base, oxpeft.LoraConfig(r=4, target_modules=["wte"], init_lora_weights=False))
    torch.nn.init.normal_(model.base_model.model.transformer.wte.lora_embedding_A["default"])
    expected = logits(model, x)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-5, rtol=1e-5)


def test_conv2d_lora_merges():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    model = oxpeft.get_peft_model(net, oxpeft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            assert not torch.allclose(model(x), expected)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "gaussian", True])
def test_init_methods_start_as_the_base_model(init, input_ids):
    base = make_llama()
    expected = logits(base, input_ids)
    model = oxpeft.get_peft_model(twin(base), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    atol = 1e-4 if str(init).startswith("pissa_niter") else 1e-5
    torch.testing.assert_close(logits(model, input_ids), expected, atol=atol, rtol=1e-4)


def test_safe_merge_refuses_nan_and_changes_nothing(input_ids):
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.fill_(float("nan"))
    w0 = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, w0)


def test_named_adapters_save_in_subfolders_and_reload(tmp_path, input_ids):
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    torch.manual_seed(1)
    model.add_adapter("other", oxpeft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    assert model.active_adapter == "default"
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    model.set_adapter("other")
    expected = logits(model, input_ids)
    loaded = oxpeft.PeftModel.from_pretrained(make_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert loaded.active_adapter == "default"
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, input_ids), expected)
