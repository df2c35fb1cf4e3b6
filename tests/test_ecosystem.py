"""TRL, transformers' Trainer and adapter API, accelerate and the Hub with oxpeft as `peft`.

Each scenario runs a script of tests/ecosystem/ in a fresh process whose `import peft` answers with oxpeft (the
alias installed with `--target` into a temporary folder, first on PYTHONPATH); nothing of TRL, transformers or
accelerate is patched. The real peft stays installed and is the oracle: it loads the saved adapters in a
separate process (tests/ecosystem/peft_oracle.py), and its logits must equal oxpeft's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="HF PEFT is the oracle for these tests (pip install '.[test]')")
pytest.importorskip("trl", reason="TRL is tested here (pip install '.[test]')")

SCRIPTS = Path(__file__).parent / "ecosystem"


@pytest.fixture(scope="module")
def alias(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("alias") / "site"
    out = subprocess.run(
        [sys.executable, "-m", "oxpeft.cli", "alias", "install", "--target", str(target)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return target


def run(script: str, *args: str, alias: Path | None = None, timeout: int = 600) -> None:
    """Run tests/ecosystem/`script` with `args`; with `alias`, `import peft` is oxpeft there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # The alias goes first; anything already on PYTHONPATH (a source checkout of oxpeft) stays after it. Without
    # the alias no PYTHONPATH entry may shadow the real peft either.
    outer = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(([str(alias)] if alias is not None else []) + outer)
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert out.returncode == 0, f"{script} {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text(encoding="utf-8"))


ADAPTER_ONLY = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def assert_adapter_only(names: list[str]) -> None:
    assert set(ADAPTER_ONLY) <= set(names), names
    assert not any(n.startswith(("model", "pytorch_model", "config.json")) for n in names), names


def assert_peft_loads_it(adapter: Path, base: Path, expected: Path, tmp_path: Path, nf4: bool = False, atol=1e-5):
    oracle = tmp_path / "oracle.pt"
    run("peft_oracle.py", str(adapter), str(base), str(oracle), *(["nf4"] if nf4 else []))
    torch.testing.assert_close(torch.load(oracle), torch.load(expected), atol=atol, rtol=atol)


@pytest.mark.parametrize("entry", ["config", "wrapped"])
def test_trl_sft_trainer_trains_lora_and_saves_an_adapter_peft_loads(entry, alias, tmp_path):
    run("sft.py", str(tmp_path), entry, "lora", alias=alias)
    info = result(tmp_path)
    assert info["peft"] == "oxpeft" and info["model_class"] == "oxpeft.peft_model.PeftModelForCausalLM"
    assert info["is_peft_model"] is True  # accelerate's check, which TRL and the Trainer use
    assert len(info["losses"]) == 3 and info["adapter_changes_output"]
    assert_adapter_only(info["files"]["."])
    assert_adapter_only(info["checkpoint"]["checkpoint-3"])
    assert_peft_loads_it(tmp_path / "final", tmp_path / "base", tmp_path / "logits.pt", tmp_path)


@pytest.mark.parametrize("entry", ["config", "wrapped"])
def test_trl_sft_trainer_trains_qlora_on_oxpeft_nf4(entry, alias, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes quantises the oracle's base")
    run("sft.py", str(tmp_path), entry, "qlora", alias=alias)
    info = result(tmp_path)
    assert len(info["losses"]) == 3 and all(loss == loss for loss in info["losses"])
    assert_adapter_only(info["files"]["."])
    # The real peft on bitsandbytes' NF4 of the same base (bf16 compute in both).
    assert_peft_loads_it(tmp_path / "final", tmp_path / "base", tmp_path / "logits.pt", tmp_path, nf4=True, atol=1e-2)


def test_plain_trainer_with_default_arguments_saves_adapter_checkpoints_and_resumes_exactly(alias, tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resume"
    run("trainer.py", str(straight), "straight", alias=alias)
    run("trainer.py", str(resumed), "resume", alias=alias)
    info = result(straight)
    assert info["peft"] == "oxpeft" and len(info["losses"]) == 4
    # The Trainer read the columns from the base model's forward (remove_unused_columns left at True).
    assert {"input_ids", "attention_mask", "labels"} <= set(info["signature_columns"])
    for name in ("checkpoint-2", "checkpoint-4"):
        assert_adapter_only(info["checkpoints"][name])
    # Resuming from checkpoint-2 ends where the straight run ends: same losses after the resume, same adapter.
    assert result(resumed)["losses"][-2:] == info["losses"][-2:]
    ours, again = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (straight, resumed))
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)


def test_plain_trainer_loads_the_best_adapter_at_the_end(alias, tmp_path):
    from safetensors.torch import load_file

    run("trainer.py", str(tmp_path), "best", alias=alias)
    info = result(tmp_path)
    best_step = min(info["eval_losses"], key=info["eval_losses"].get)
    assert info["best"].endswith(f"checkpoint-{best_step}")
    best = load_file(Path(info["best"]) / "adapter_model.safetensors")
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert_peft_loads_it(tmp_path / "adapter", _save_base(tmp_path), tmp_path / "logits.pt", tmp_path)


def _save_base(tmp_path: Path) -> Path:
    """The tiny Llama the scripts build, saved for the oracle (built here with the same seed)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from tiny import tiny_llama
    finally:
        sys.path.remove(str(SCRIPTS))
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_transformers_adapter_api_end_to_end(alias, tmp_path):
    run("adapter_api.py", str(tmp_path), alias=alias)
    info = result(tmp_path)
    assert info["peft"] == "oxpeft"
    failed = [step for step, ok in info["steps"].items() if not ok]
    assert not failed, failed
    assert set(info["saved"]["."]) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not any(n.startswith("model") for n in info["saved"]["."])
    assert_peft_loads_it(tmp_path / "saved", tmp_path / "base", tmp_path / "logits.pt", tmp_path)


def test_transformers_adapter_api_loads_and_adds_lora_on_fused_experts(alias, tmp_path):
    """`model.load_adapter` of a real-peft adapter on Qwen3-MoE's fused expert parameters (`target_parameters`), and
    `model.add_adapter` of one, saved for the real peft: equal logits both ways."""
    import copy

    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import peft

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(config).eval()
    moe.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    trained = peft.get_peft_model(copy.deepcopy(moe), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=experts, init_lora_weights=False)).eval()
    trained.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    run("adapter_api_moe.py", str(tmp_path / "base"), str(tmp_path / "adapter"), str(out), alias=alias)
    assert result(out)["peft"] == "oxpeft" and result(out)["active"] == ["added"]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out / "loaded.pt"), trained(ids).logits, atol=1e-6, rtol=0)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(moe), out / "added").eval()
        torch.testing.assert_close(theirs(ids).logits, torch.load(out / "added.pt"), atol=1e-6, rtol=0)


PROBE = """
import warnings
warnings.simplefilter("always")
import transformers.trainer
import oxpeft
from torch import nn
with warnings.catch_warnings(record=True) as caught:
    oxpeft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), oxpeft.LoraConfig(target_modules=["0"]))
    oxpeft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), oxpeft.LoraConfig(target_modules=["0"]))
import json
print(json.dumps([str(w.message) for w in caught if "oxpeft alias install" in str(w.message)]))
"""


def test_without_the_alias_a_training_script_is_told_to_install_it(alias):
    """Where `import peft` is the real peft (or none), TRL and transformers would treat an oxpeft model as a plain
    module deep inside; oxpeft says so once, in one line, naming the command."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for path, expected in ((None, 1), (alias, 0)):
        if path is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        messages = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(messages) == expected, messages
        if expected:
            assert "finds the real peft" in messages[0] and "\n" not in messages[0]


def test_accelerate_fsdp_adapter_only_state_dicts(alias, tmp_path):
    run("accelerate_fsdp.py", str(tmp_path), alias=alias)
    info = result(tmp_path)
    assert info["peft"] == "oxpeft" and info["is_peft_model"]
    assert info["keys"] == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight" for i in range(2) for p in "qv" for ab in "AB"
    )
    assert info["fsdp_units"] > 1  # the policy split the model into units
    assert info["differs_before"] and info["equal_after"]


def test_trl_added_tokens_train_as_trainable_tokens_and_peft_loads_them(alias, tmp_path):
    """SFTTrainer(chat_template_path=...) adds tokens, resizes the embeddings and sets trainable_token_indices: the
    new rows train, are saved under PEFT's keys, and the real peft gets the same logits on input with them."""
    run("sft_added_tokens.py", str(tmp_path), alias=alias)
    info = result(tmp_path)
    assert info["peft"] == "oxpeft" and len(info["losses"]) == 3
    assert info["trainable_token_indices"] == {"embed_tokens": [254, 255]}  # the two tokens the template added
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in info["keys"]
    assert info["rows_trained"]
    oracle = tmp_path / "oracle.pt"
    run("peft_oracle.py", str(tmp_path / "final"), str(tmp_path / "base"), str(oracle), str(tmp_path / "probe.ids.pt"))
    torch.testing.assert_close(torch.load(oracle), torch.load(tmp_path / "logits.pt"), atol=1e-5, rtol=1e-5)
