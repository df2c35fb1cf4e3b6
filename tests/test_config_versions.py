"""Adapter configs across real PEFT releases: what 0.6.2, 0.10.0, 0.13.2 and the installed (latest) release write
loads in oxpeft with the same outputs, and what oxpeft writes for each of them loads there with the same outputs.

Each release is installed by this test with `pip install --no-deps --target ~/.cache/oxpeft/peft-releases/<ver>`
(kept for reruns) and run in a subprocess whose PYTHONPATH puts it before the installed peft. Old releases import
fine with the current torch and transformers; one subprocess per release does all its writing and loading.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import oxpeft
from conftest import make_llama
from oxpeft import cli

TESTS_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("OXPEFT_PEFT_RELEASES", Path.home() / ".cache" / "oxpeft" / "peft-releases"))
try:
    LATEST = importlib.metadata.version("peft")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("HF PEFT is the oracle for these tests (pip install '.[test]')", allow_module_level=True)
RELEASES = ["0.6.2", "0.10.0", "0.13.2", LATEST]
ATOL = 1e-5

# name -> (first release that has the feature, LoraConfig kwargs). init_lora_weights=False leaves A and B random,
# so every adapter really changes the outputs.
CASES = {
    "plain": ("0.3.0", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "patterns": (
        "0.6.0",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"q_proj": 2},
             alpha_pattern={"up_proj": 16}),
    ),
    "rslora": ("0.8.0", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"])),
    "dora": ("0.9.0", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
}


# peft_type -> (first release, PEFT config class, kwargs): a config of every method oxpeft's table covers.
METHODS = {
    "LORA": ("0.3.0", "LoraConfig", dict(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")),
    "ADALORA": ("0.3.0", "AdaLoraConfig", dict(target_r=4, init_r=6, total_step=100, target_modules=["q_proj"])),
    "IA3": ("0.4.0", "IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "LOHA": ("0.6.0", "LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj"])),
    "LOKR": ("0.6.0", "LoKrConfig", dict(r=4, alpha=8, decompose_both=True, target_modules=["q_proj"])),
    "PROMPT_TUNING": ("0.3.0", "PromptTuningConfig", dict(num_virtual_tokens=8, task_type="CAUSAL_LM")),
    "P_TUNING": ("0.3.0", "PromptEncoderConfig", dict(num_virtual_tokens=8, encoder_hidden_size=32)),
    "PREFIX_TUNING": ("0.3.0", "PrefixTuningConfig", dict(num_virtual_tokens=8, prefix_projection=True)),
}


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3])


def _cases_for(release: str) -> list[str]:
    return [name for name, (since, _) in CASES.items() if _v(since) <= _v(release)]


def _input_ids() -> torch.Tensor:
    torch.manual_seed(99)
    return torch.randint(0, 256, (2, 10))


# Runs inside a PEFT release. Writes adapters for the "write" jobs, loads the "load" jobs; every job records the
# logits of a fixed input and, for loads, the config as the release sees it, or the error it raised.
RELEASE_SCRIPT = r"""
import enum, json, sys, warnings
import torch
from safetensors.torch import save_file
import peft
from conftest import make_llama

spec = json.load(open(sys.argv[1]))
assert peft.__version__ == spec["version"], (peft.__version__, spec["version"])
ids = torch.tensor(spec["input_ids"])

def plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value

results = {}
for job in spec["configs"]:
    getattr(peft, job["cls"])(**job["kwargs"]).save_pretrained(job["dir"])
for job in spec["write"]:
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **job["kwargs"])
    torch.manual_seed(7)
    model = peft.get_peft_model(make_llama(), config).eval()
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.contiguous()}, job["logits"])
    model.save_pretrained(job["dir"])
for job in spec["load"]:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = peft.PeftConfig.from_pretrained(job["dir"])
            model = peft.PeftModel.from_pretrained(make_llama(), job["dir"]).eval()
        with torch.no_grad():
            save_file({"logits": model(input_ids=ids).logits.contiguous()}, job["logits"])
        results[job["dir"]] = {
            "config": {k: plain(v) for k, v in config.to_dict().items()},
            "warnings": [str(w.message) for w in caught if "nexpected keyword" in str(w.message)],
        }
    except Exception as exc:
        results[job["dir"]] = {"error": f"{type(exc).__name__}: {exc}"}
json.dump(results, open(spec["results"], "w"))
"""


def _install(release: str) -> Path:
    """The folder holding `peft` of this release, installed on first use."""
    if release == LATEST:
        return Path(importlib.metadata.distribution("peft").locate_file(""))
    target = CACHE / release
    if (target / "peft" / "__init__.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{release}.", dir=CACHE))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--retries", "1", "--timeout", "20",
         "--target", str(staging), f"peft=={release}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot install peft=={release} from PyPI (pip said: {proc.stderr.strip()[-300:]})")
    try:
        os.replace(staging, target)
    except OSError:  # another run installed it meanwhile
        pass
    return target


def _run_release(release: str, workdir: Path, write: list[dict], load: list[dict], configs: list[dict]) -> dict:
    spec = {
        "version": release,
        "input_ids": _input_ids().tolist(),
        "configs": configs,
        "write": write,
        "load": load,
        "results": str(workdir / f"results-{release}.json"),
    }
    spec_path = workdir / f"spec-{release}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_install(release)), str(TESTS_DIR)]))
    proc = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT, str(spec_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"PEFT {release} failed:\n{proc.stderr[-3000:]}"
    return json.loads(Path(spec["results"]).read_text())


def _logits(path: Path | str) -> torch.Tensor:
    return load_file(str(path))["logits"]


def _oxpeft_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_input_ids()).logits


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    """For each release: adapters it wrote, adapters oxpeft wrote for it, and what the release made of those.

    The 0.10.0 run also loads an adapter that `oxpeft config migrate` rewrote in place (see the CLI test).
    """
    root = tmp_path_factory.mktemp("exchange")
    for release in RELEASES:
        _install(release)  # skips the module early if PyPI is out of reach
    out = {}
    for release in RELEASES:
        ours = {}
        for name in _cases_for(release):
            _, kwargs = CASES[name]
            ours[name] = root / f"oxpeft-for-{release}-{name}"
            torch.manual_seed(7)
            config = oxpeft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)
            model = oxpeft.get_peft_model(make_llama(), config).eval()
            save_file({"logits": _oxpeft_logits(model).contiguous()}, str(root / f"oxpeft-for-{release}-{name}.st"))
            model.save_pretrained(ours[name], peft_version=release)
        out[release] = dict(root=root, ours=ours, theirs={n: root / f"peft-{release}-{n}" for n in ours})

    migrated = root / "cli-migrated"
    shutil.copytree(out[LATEST]["ours"]["dora"], migrated)
    cli_rc = cli.main(["config", "migrate", str(migrated), "--to", "0.10.0"])
    out["cli"] = dict(dir=migrated, rc=cli_rc, logits=root / "cli-migrated-loaded.st")

    for release in RELEASES:
        data = out[release]
        loads = [{"dir": str(d), "logits": str(root / f"{release}-loaded-{n}.st")} for n, d in data["ours"].items()]
        if release == "0.10.0":
            loads.append({"dir": str(migrated), "logits": str(out["cli"]["logits"])})
        writes = [
            {"dir": str(d), "kwargs": CASES[n][1], "logits": str(root / f"peft-{release}-{n}.st")}
            for n, d in data["theirs"].items()
        ]
        data["configs"] = {
            name: root / f"config-{release}-{name}" for name, (since, _, _) in METHODS.items() if _v(since) <= _v(release)
        }
        configs = [{"dir": str(d), "cls": METHODS[n][1], "kwargs": METHODS[n][2]} for n, d in data["configs"].items()]
        data["results"] = _run_release(release, root, writes, loads, configs)
    return out


@pytest.mark.parametrize("release", RELEASES)
def test_adapters_written_by_release_load_in_oxpeft_with_same_outputs(exchange, release):
    data = exchange[release]
    for name, directory in data["theirs"].items():
        raw = json.loads((directory / "adapter_config.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a release's own config needs no note at all
            config = oxpeft.PeftConfig.from_pretrained(directory)
        _, kwargs = CASES[name]
        for key, value in kwargs.items():
            got = getattr(config, key)
            assert (sorted(got) if isinstance(got, set) else got) == (sorted(value) if key == "target_modules" else value)
        report = json.loads(oxpeft._native.config_inspect(json.dumps(raw)))
        assert release in report["loads_as_is"], report
        if "peft_version" not in raw:
            assert report["written_by_inferred"] and release in report["written_by"], report

        model = oxpeft.PeftModel.from_pretrained(make_llama(), directory)
        expected = _logits(data["root"] / f"peft-{release}-{name}.st")
        assert not torch.allclose(expected, _oxpeft_logits(make_llama()), atol=1e-3), "adapter changes outputs"
        torch.testing.assert_close(_oxpeft_logits(model), expected, atol=ATOL, rtol=0, msg=f"{name} from {release}")


@pytest.mark.parametrize("release", RELEASES)
def test_configs_oxpeft_writes_for_release_load_there_with_same_outputs(exchange, release):
    data = exchange[release]
    for name, directory in data["ours"].items():
        result = data["results"][str(directory)]
        assert "error" not in result, f"PEFT {release} refused oxpeft's {name} adapter: {result.get('error')}"
        assert result["warnings"] == [], "oxpeft must write only fields the release knows"
        written = json.loads((directory / "adapter_config.json").read_text())
        for key, value in written.items():
            seen = result["config"][key]
            if isinstance(value, list) and isinstance(seen, list):
                value, seen = sorted(value), sorted(seen)
            assert seen == value, f"PEFT {release} read {key}={seen!r}, the file says {value!r}"
        assert ("peft_version" in written) == (_v(release) >= (0, 18, 0))
        ours = _logits(data["root"] / f"oxpeft-for-{release}-{name}.st")
        loaded = _logits(data["root"] / f"{release}-loaded-{name}.st")
        torch.testing.assert_close(loaded, ours, atol=ATOL, rtol=0, msg=f"{name} in PEFT {release}")


@pytest.mark.parametrize("release", RELEASES)
def test_every_method_config_of_release_reads_and_rewrites_exactly(exchange, release):
    """oxpeft reads each method's config as the release writes it, and writes it back for that release key for key."""
    for name, directory in exchange[release]["configs"].items():
        text = (directory / "adapter_config.json").read_text()
        raw = json.loads(text)
        upgraded, notes = oxpeft._native.config_upgrade(text)
        assert notes == [], (name, notes)
        assert json.loads(upgraded)["peft_type"] == name
        rewritten = json.loads(oxpeft._native.config_downgrade(upgraded, release))
        if "peft_version" in raw:
            # oxpeft signs what it writes: the release, with oxpeft's version as a local label.
            assert rewritten.pop("peft_version") == f"{release}+oxpeft.{oxpeft.__version__}"
            raw.pop("peft_version")
        assert rewritten == raw, f"{name} for PEFT {release}: {set(rewritten) ^ set(raw)}"
        report = json.loads(oxpeft._native.config_inspect(text))
        assert release in report["loads_as_is"], (name, report)


def test_feature_the_target_lacks_is_refused(tmp_path):
    _, kwargs = CASES["dora"]
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    with pytest.raises(ValueError, match=r"'use_dora' = true needs PEFT >= 0\.9\.0"):
        model.save_pretrained(tmp_path / "old", peft_version="0.8.2")
    assert not (tmp_path / "old" / "adapter_config.json").exists(), "nothing half-written"
    rslora = oxpeft.LoraConfig(r=4, use_rslora=True, lora_bias=True, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"use_rslora.*0\.8\.0.*lora_bias.*0\.14\.0|lora_bias.*use_rslora"):
        rslora.save_pretrained(tmp_path / "older", peft_version="0.7.1")


def _write_config(directory: Path, data: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return directory


def _peft_0_10_config(**changes) -> dict:
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8,
        "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    config.update(changes)
    return config


def test_unknown_neutral_field_is_dropped_with_a_warning(tmp_path):
    directory = _write_config(tmp_path, _peft_0_10_config(future_switch=False, future_table={}))
    with pytest.warns(UserWarning, match="future_switch") as caught:
        config = oxpeft.PeftConfig.from_pretrained(directory)
    assert any("future_table" in str(w.message) for w in caught)
    assert not hasattr(config, "future_switch") and config.r == 4


def test_unknown_non_neutral_field_is_refused_unless_not_strict(tmp_path):
    directory = _write_config(tmp_path, _peft_0_10_config(future_scale=2.5, peft_version="0.30.0"))
    with pytest.raises(ValueError, match=r"future_scale.*PEFT 0\.30\.0.*strict=False") as info:
        oxpeft.PeftConfig.from_pretrained(directory)
    assert str(directory) in str(info.value)
    with pytest.warns(UserWarning, match=r"WARNING: ignoring unknown field 'future_scale'"):
        config = oxpeft.PeftConfig.from_pretrained(directory, strict=False)
    assert config.r == 4


def test_peft_model_from_pretrained_takes_strict(exchange, tmp_path):
    directory = tmp_path / "adapter"
    shutil.copytree(exchange[LATEST]["theirs"]["plain"], directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(dict(config, future_scale=2.5)))
    with pytest.raises(ValueError, match="future_scale"):
        oxpeft.PeftModel.from_pretrained(make_llama(), directory)
    with pytest.warns(UserWarning, match="WARNING: ignoring unknown field 'future_scale'"):
        model = oxpeft.PeftModel.from_pretrained(make_llama(), directory, strict=False)
    expected = _logits(exchange[LATEST]["root"] / f"peft-{LATEST}-plain.st")
    torch.testing.assert_close(_oxpeft_logits(model), expected, atol=ATOL, rtol=0)


def test_bad_configs_give_clear_errors(tmp_path):
    cases = {
        "malformed": ('{"peft_type": "LORA", "r": 4,', r"not valid JSON"),
        "wrong-type": (_peft_0_10_config(peft_type="LORAX"), r"peft_type 'LORAX'.*LORA, ADALORA"),
        "no-type": ({k: v for k, v in _peft_0_10_config().items() if k != "peft_type"}, r"missing required key 'peft_type'"),
        "no-r": ({k: v for k, v in _peft_0_10_config().items() if k != "r"}, r"missing required key 'r'"),
        "bad-r": (_peft_0_10_config(r="four"), r"field 'r'.*non-negative integer"),
        "list": ("[1, 2]", r"JSON object"),
    }
    for name, (data, pattern) in cases.items():
        directory = _write_config(tmp_path / name, data)
        with pytest.raises(ValueError, match=pattern):
            oxpeft.PeftConfig.from_pretrained(directory)


def test_peft_0_2_layout_is_explained(tmp_path):
    legacy = _peft_0_10_config(enable_lora=[True, False, True], merge_weights=False)
    with pytest.raises(ValueError, match=r"PEFT 0\.1/0\.2 layout.*enable_lora"):
        oxpeft.PeftConfig.from_pretrained(_write_config(tmp_path / "merged", legacy))
    plain = _peft_0_10_config(enable_lora=None, merge_weights=True)
    with pytest.warns(UserWarning, match="merge_and_unload"):
        config = oxpeft.PeftConfig.from_pretrained(_write_config(tmp_path / "plain", plain))
    assert config.r == 4


def test_cli_check_and_migrate(exchange, tmp_path, capsys):
    source = exchange[LATEST]["theirs"]["dora"]
    assert cli.main(["config", "check", str(source)]) == 0
    report = capsys.readouterr().out
    assert f"written by:     PEFT {LATEST}" in report
    assert "use_dora=true (PEFT >= 0.9.0)" in report
    assert "migratable to:  PEFT 0.9.0 or later" in report

    assert cli.main(["config", "migrate", str(source), "--to", "0.8.2", "-o", str(tmp_path / "old")]) == 1
    assert "use_dora" in capsys.readouterr().err
    assert not (tmp_path / "old" / "adapter_config.json").exists()

    copy = tmp_path / "copy"
    assert cli.main(["config", "migrate", str(source), "--to", "0.10.0", "-o", str(copy)]) == 0
    assert (copy / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()
    assert json.loads((copy / "adapter_config.json").read_text())["use_dora"] is True

    # In place (done by the fixture): the original is kept as a backup, and PEFT 0.10.0 loads the rewrite
    # with the outputs oxpeft computed before saving.
    cli_run = exchange["cli"]
    assert cli_run["rc"] == 0
    original = json.loads((cli_run["dir"] / "adapter_config.json.bak").read_text())
    migrated = json.loads((cli_run["dir"] / "adapter_config.json").read_text())
    assert original["peft_version"] == f"{LATEST}+oxpeft.{oxpeft.__version__}" and migrated["use_dora"] is True
    result = exchange["0.10.0"]["results"][str(cli_run["dir"])]
    assert "error" not in result, result
    assert set(migrated) == set(result["config"]), "exactly the fields PEFT 0.10.0 has"
    expected = _logits(exchange[LATEST]["root"] / f"oxpeft-for-{LATEST}-dora.st")
    torch.testing.assert_close(_logits(cli_run["logits"]), expected, atol=ATOL, rtol=0)
