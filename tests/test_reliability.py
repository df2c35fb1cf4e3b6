"""Hostile inputs that must be refused up front, leaving nothing changed and nothing written outside the target."""

from __future__ import annotations

import os

import pytest
import torch

import oxpeft
from conftest import make_llama, twin


def _lora(**kwargs):
    return oxpeft.LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **kwargs})


@pytest.mark.parametrize("name", ["/tmp/x", "/", "..", "a/b", "a\\b", "a\0b", "", "x.y"])
def test_adapter_names_that_are_paths_are_refused_before_anything_changes(name, tmp_path):
    """An adapter name becomes a folder name in save_pretrained: '/tmp/x' would write to /tmp/x, '/' to /."""
    base = make_llama()
    model = oxpeft.get_peft_model(twin(base), _lora())
    model.save_pretrained(tmp_path / "saved")
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.load_adapter(tmp_path / "saved", adapter_name=name)
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.add_adapter(name, _lora())
    with pytest.raises(ValueError, match="invalid adapter name"):
        oxpeft.get_peft_model(twin(base), _lora(), adapter_name=name)
    assert {n for n, _ in model.named_parameters()} == before and list(model.peft_config) == ["default"]


def test_prompt_adapter_names_are_checked_the_same_way():
    config = oxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="invalid adapter name"):
        oxpeft.get_peft_model(make_llama(), config, adapter_name="../up")


@pytest.mark.parametrize("subfolder", ["../x", "a/../../x", "/etc", "a\0b"])
def test_a_subfolder_cannot_leave_the_adapter_folder(subfolder, tmp_path):
    base = make_llama()
    oxpeft.get_peft_model(twin(base), _lora()).save_pretrained(tmp_path / "repo" / "inner")
    (tmp_path / "x").mkdir()  # what '../x' would reach
    with pytest.raises(ValueError, match="invalid subfolder"):
        oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "repo", subfolder=subfolder)
    with pytest.raises(ValueError, match="invalid subfolder"):
        oxpeft.LoraConfig.from_pretrained(tmp_path / "repo", subfolder=subfolder)
    loaded = oxpeft.PeftModel.from_pretrained(twin(base), tmp_path / "repo", subfolder="inner")  # inside: fine
    assert isinstance(loaded, oxpeft.PeftModel)
    assert torch.is_tensor(next(loaded.parameters())) and not os.listdir(tmp_path / "x")


def _time_limit(seconds: float):
    """A context that fails the test if its block runs longer than `seconds` (SIGALRM)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def limit():
        def expired(*_):
            raise TimeoutError(f"took longer than {seconds} s")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return limit()


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_a_catastrophic_regex_cannot_hang(field, tmp_path):
    """`(.+)+X` makes Python's backtracking `re` run for hours on a long module name; oxpeft matches user patterns
    with a linear-time engine. (The names here are short; the pattern is still exponential for `re`.)"""
    evil = "(.+)+X"
    kwargs = {"target_modules": ["q_proj"]}
    if field == "target_modules":
        kwargs = {"target_modules": evil}
    else:
        kwargs[field] = {evil: 2}
    with _time_limit(20):
        if field == "target_modules":
            with pytest.raises(ValueError, match="matches no module"):
                oxpeft.get_peft_model(make_llama(), _lora(**kwargs))
        else:
            model = oxpeft.get_peft_model(make_llama(), _lora(**kwargs))
            assert model.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 2


def test_a_regex_that_does_not_compile_is_one_clear_error():
    with pytest.raises(ValueError, match=r"target_modules: the regex '\(\[' cannot be used"):
        oxpeft.get_peft_model(make_llama(), _lora(target_modules="(["))
    with pytest.raises(ValueError, match="rank_pattern: the regex"):
        oxpeft.get_peft_model(make_llama(), _lora(rank_pattern={"([": 2}))


def test_look_ahead_patterns_still_work():
    """PEFT users write `^(?!.*vision).*q_proj$`-style patterns; they keep working (bounded backtracking)."""
    model = oxpeft.get_peft_model(make_llama(), _lora(target_modules=r"^(?!.*layers\.1\.).*q_proj$"))
    assert model.targeted_module_names == ["model.layers.0.self_attn.q_proj"]


def test_a_huge_target_list_is_matched_in_linear_time_and_not_echoed():
    """300,000 entries: one set, not a scan per module; the error names a few entries and counts the rest."""
    entries = [f"module_{i}" for i in range(300_000)] + ["q_proj"]
    with _time_limit(60):
        with pytest.raises(ValueError) as info:
            oxpeft.get_peft_model(make_llama(), _lora(target_modules=entries))
        accepted = oxpeft.get_peft_model(make_llama(), _lora(target_modules=["q_proj", "v_proj"] * 150_000))
    message = str(info.value)
    assert "299,995 more entries that match no module" in message and len(message) < 3000
    assert len(accepted.targeted_module_names) == 4


@pytest.mark.parametrize("field", ["r", "rank_pattern"])
def test_a_config_rank_that_does_not_fit_the_file_is_refused_before_allocating(field, tmp_path):
    """`r` edited to 10**12 in adapter_config.json: one error naming the module, nothing allocated, nothing changed."""
    import json

    base = make_llama()
    oxpeft.get_peft_model(twin(base), _lora()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    if field == "r":
        config["r"] = 10**12
    else:
        config["rank_pattern"] = {"layers.1.self_attn.q_proj": 20000}
    path.write_text(json.dumps(config))
    model = twin(base)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with _time_limit(30):
        with pytest.raises(ValueError, match=r"has shape \(2, 64\), rank 2, but the config gives '.*q_proj' rank (1000000000000|20000)"):
            oxpeft.PeftModel.from_pretrained(model, tmp_path)
    assert {n for n, _ in model.named_parameters()} == set(before)
    assert not any(isinstance(m, oxpeft.tuners.lora.LoraLayer) for m in model.modules())


def test_a_huge_rank_in_a_new_adapter_is_one_clear_error():
    model = make_llama()
    with pytest.raises(ValueError, match=r"r=1000000000000 needs about .* GiB of adapter weights .* choose a smaller r"):
        oxpeft.get_peft_model(model, _lora(r=10**12))
    assert not any(isinstance(m, oxpeft.tuners.lora.LoraLayer) for m in model.modules())


def test_a_look_around_pattern_that_exhausts_the_budget_is_one_clear_error():
    """Back-references and look-around backtrack (the regex crate cannot run them); on a long module name a pattern
    like `((a+)+)\\2x` runs out of the step budget in milliseconds and is refused naming the field, not a hang."""

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, "a" * 40, torch.nn.Linear(4, 4))

    for field, value in [("target_modules", r"((a+)+)\2x"), ("rank_pattern", {r"(a|aa)+\1(?=c)c": 2})]:
        kwargs = {"target_modules": ["a" * 40], field: value}
        with _time_limit(10):
            with pytest.raises(ValueError, match=rf"{field}: the regex .* cannot be used: .*backtracking"):
                oxpeft.get_peft_model(Wide(), oxpeft.LoraConfig(r=2, **kwargs))


def test_ctrl_c_stops_a_quantisation_within_a_second(tmp_path):
    """quantize_model runs one native call per layer (each well under a second), so a signal stops it between
    two layers: KeyboardInterrupt for Ctrl-C, the default exit for SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "quantise.py"
    # Quantises model after model until stopped, so the signal always lands in the middle of the work, however
    # fast the machine.
    script.write_text(
        "import sys, torch, oxpeft\n"
        "from oxpeft.quant import QuantizationConfig, quantize_model\n"
        "config = QuantizationConfig(load_in_4bit=True)\n"
        "make = lambda: torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(40)])\n"
        "quantize_model(make(), config)\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    while True:\n"
        "        quantize_model(make(), config)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    for signum, code in [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)]:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # quantising
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 1.5, signum
        assert proc.returncode == code, (signum, out, err)
        assert ("interrupted" in out) == (signum == signal.SIGINT)
