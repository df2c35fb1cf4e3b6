"""LoRA adapters saved for transformers 4's per-expert MoE layers (Mixtral's w1 / w3 / w2, Qwen-MoE's gate_proj /
up_proj / down_proj per expert) loaded into transformers 5's fused expert stacks: equal to the real peft's conversion
of the same file, and saved back in a form the real peft loads."""

from __future__ import annotations

import pytest
import torch

import oxpeft

peft = pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig  # noqa: E402

HIDDEN, INTER, EXPERTS, R = 16, 24, 3, 2
MODELS = {
    "mixtral": (
        lambda: MixtralConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=EXPERTS,
                              num_experts_per_tok=2),
        "block_sparse_moe", {"w1": "gate", "w3": "up", "w2": "down"},
    ),
    "qwen3_moe": (
        lambda: Qwen3MoeConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=INTER,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               num_experts=EXPERTS, num_experts_per_tok=2),
        "mlp", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    ),
}  # fmt: skip


def _legacy_adapter(tmp_path, kind: str, use_rslora: bool = False):
    make_config, moe, layers = MODELS[kind]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config()).save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for block in range(2):
        for expert in range(EXPERTS):
            for name, role in layers.items():
                out_f, in_f = (HIDDEN, INTER) if role == "down" else (INTER, HIDDEN)
                key = f"base_model.model.model.layers.{block}.{moe}.experts.{expert}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(R, in_f, generator=gen) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, R, generator=gen) * 0.3
        key = f"base_model.model.model.layers.{block}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(R, HIDDEN, generator=gen) * 0.3
        tensors[f"{key}.lora_B.weight"] = torch.randn(16, R, generator=gen) * 0.3
    (tmp_path / "adapter").mkdir()
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    config = peft.LoraConfig(r=R, lora_alpha=4, use_rslora=use_rslora, target_modules=[*layers, "q_proj"])
    config.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("kind", list(MODELS))
def test_per_expert_adapter_loads_into_fused_experts_like_peft(tmp_path, kind):
    base, adapter = _legacy_adapter(tmp_path, kind)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ours = oxpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        expected, plain = theirs(ids).logits, AutoModelForCausalLM.from_pretrained(base)(ids).logits
        assert (expected - plain).abs().max() > 1e-2  # the adapter does something
        torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-5)
    config = ours.peft_config["default"]
    assert config.target_parameters == ["experts.down_proj", "experts.gate_up_proj"]
    assert config.target_modules == ["q_proj"] or set(config.target_modules) >= {"q_proj"}
    ours.save_pretrained(tmp_path / "saved")
    back = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=1e-5)


def test_rslora_keeps_the_scaling_and_a_lone_half_is_refused(tmp_path):
    from safetensors.torch import load_file

    base, adapter = _legacy_adapter(tmp_path, "mixtral", use_rslora=True)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    ours = oxpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    # The per-expert adapter's own output, computed by hand on the fused stacks: scaling alpha / sqrt(r) for every
    # expert's gate and up halves.
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tensors = load_file(adapter / "adapter_model.safetensors")
    scaling = 4 / R**0.5
    with torch.no_grad():
        for block in range(2):
            experts = model.model.layers[block].mlp.experts
            for e in range(EXPERTS):
                key = f"base_model.model.model.layers.{block}.block_sparse_moe.experts.{e}"
                delta = lambda n: tensors[f"{key}.{n}.lora_B.weight"] @ tensors[f"{key}.{n}.lora_A.weight"]  # noqa: E731
                experts.gate_up_proj[e] += scaling * torch.cat([delta("w1"), delta("w3")])
                experts.down_proj[e] += scaling * delta("w2")
            attn = model.model.layers[block].self_attn.q_proj
            key = f"base_model.model.model.layers.{block}.self_attn.q_proj"
            attn.weight += scaling * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    del tensors["base_model.model.model.layers.0.block_sparse_moe.experts.0.w3.lora_A.weight"]
    for e in range(EXPERTS):
        for f in ("lora_A", "lora_B"):
            for block in range(2):
                tensors.pop(f"base_model.model.model.layers.{block}.block_sparse_moe.experts.{e}.w3.{f}.weight", None)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not both halves of the fused gate_up_proj"):
        oxpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
