"""The installed package: native module, version, public API, and the `oxpeft` command."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import oxpeft
import oxpeft._native as native

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_the_native_core():
    assert oxpeft.__version__ == native.version()
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert native.version() == cargo["package"]["version"]


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "oxpeft.cli", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"oxpeft {oxpeft.__version__}"


def test_cli_demo_trains_saves_reloads_and_merges(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "oxpeft.cli", "demo", "--steps", "30", "--output-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo OK" in out.stdout
    assert (tmp_path / "demo" / "adapter_config.json").exists() and (tmp_path / "demo" / "adapter_model.safetensors").exists()
    assert "LoRA fine-tuning" in out.stderr  # the progress bar


def test_cli_reports_errors_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "oxpeft.cli", "demo", "--steps", "0", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode != 0
    assert "at least 10 training steps" in out.stderr
    assert "Traceback" not in out.stderr
