"""`oxpeft alias`: `import peft` answered by oxpeft, through the real command, in throw-away folders and a
throw-away virtualenv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import oxpeft
from oxpeft.alias import ALIAS_VERSION
from test_layout import PEFT_PATHS

# Each PEFT module path that oxpeft implements (the layout test's list); `import peft.<path>` must resolve.
PEFT_MODULE_PATHS = sorted(PEFT_PATHS)


def oxpeft_cli(*args: str, python: str = sys.executable, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "oxpeft.cli", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def target(tmp_path) -> Path:
    out = oxpeft_cli("alias", "install", "--target", str(tmp_path / "alias"))
    assert out.returncode == 0, out.stderr
    assert f"installed in {tmp_path / 'alias'}: peft {ALIAS_VERSION}" in out.stdout
    return tmp_path / "alias"


def test_import_peft_is_oxpeft_with_the_same_objects(target):
    probe = f"""
import importlib, importlib.metadata, importlib.util, json, sys
import peft, oxpeft
def _missing_deep():
    try:
        import peft.tuners.not_a_method.layer
    except ModuleNotFoundError as exc:
        return exc.name == "peft.tuners.not_a_method"
    return False
paths = {PEFT_MODULE_PATHS!r}
same = [p for p in paths if importlib.import_module("peft." + p) is importlib.import_module("oxpeft." + p)]
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft import LoraConfig, PeftModel, get_peft_model
print(json.dumps(dict(
    same=same,
    version=peft.__version__,
    oxpeft=peft.__oxpeft__,
    metadata=importlib.metadata.version("peft"),
    classes=[PeftModel is oxpeft.PeftModel, LoraConfig is oxpeft.LoraConfig, get_peft_model is oxpeft.get_peft_model,
             BaseTunerLayer is oxpeft.tuners.tuners_utils.BaseTunerLayer,
             ModulesToSaveWrapper is oxpeft.utils.other.ModulesToSaveWrapper],
    found=importlib.util.find_spec("peft") is not None,
    missing=importlib.util.find_spec("peft.tuners.not_a_method") is None,
    missing_deep=_missing_deep(),
)))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["same"] == PEFT_MODULE_PATHS
    assert seen["version"] == seen["metadata"] == ALIAS_VERSION == f"0.22.0+oxpeft.{oxpeft.__version__}"
    assert seen["oxpeft"] == oxpeft.__version__
    assert all(seen["classes"]) and seen["found"] and seen["missing"] and seen["missing_deep"]


def test_transformers_sees_a_new_enough_peft(target):
    probe = (
        "from transformers.utils import is_peft_available\n"
        "from transformers.integrations.peft import MIN_PEFT_VERSION\n"
        "import importlib.metadata\nfrom packaging.version import Version\n"
        "print(is_peft_available(), Version(importlib.metadata.version('peft')) >= Version(MIN_PEFT_VERSION))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_transformers_trainer_imports_the_mixed_model_from_the_alias(target):
    # transformers' trainer_utils does `from peft import PeftMixedModel, PeftModel` once peft is installed.
    probe = "import peft, oxpeft\nfrom transformers import Trainer\nprint(peft.PeftMixedModel is oxpeft.PeftMixedModel)\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]


def test_status_and_remove_leave_nothing_behind(target):
    assert "installed in" in oxpeft_cli("alias", "status", "--target", str(target)).stdout
    out = subprocess.run([sys.executable, "-c", "import peft.tuners.lora"], env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0  # leaves __pycache__ folders, which remove also clears
    out = oxpeft_cli("alias", "remove", "--target", str(target))
    assert out.returncode == 0, out.stderr
    assert list(target.iterdir()) == []
    assert "not installed" in oxpeft_cli("alias", "status", "--target", str(target)).stdout
    out = oxpeft_cli("alias", "remove", "--target", str(target))
    assert out.returncode == 1 and "no oxpeft alias" in out.stderr


def test_refuses_where_the_real_peft_is_installed_and_changes_nothing():
    pytest.importorskip("peft")  # the test oracle, installed in this environment's site-packages
    site = Path(sysconfig.get_paths()["purelib"])
    before = sorted(p.name for p in site.iterdir() if p.name.lower().startswith("peft"))
    assert any(name.endswith(".dist-info") for name in before)
    out = oxpeft_cli("alias", "install")
    assert out.returncode == 1
    assert "already holds the real peft" in out.stderr and "--target" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in site.iterdir() if p.name.lower().startswith("peft")) == before
    out = oxpeft_cli("alias", "remove")
    assert out.returncode == 1 and "not removing it" in out.stderr
    assert "holds the real peft" in oxpeft_cli("alias", "status").stdout


def test_refuses_a_target_holding_a_real_peft(tmp_path):
    fake = tmp_path / "t" / "peft-0.21.2.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.21.2\n")
    (fake / "INSTALLER").write_text("pip\n")
    before = tree(tmp_path / "t")
    out = oxpeft_cli("alias", "install", "--target", str(tmp_path / "t"))
    assert out.returncode == 1 and "real peft 0.21.2" in out.stderr
    assert tree(tmp_path / "t") == before


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A virtualenv without peft, where oxpeft is importable (through a .pth naming a folder that links to it)."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(root / "env")
    python = root / "env" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (root / "link").mkdir()
    (root / "link" / "oxpeft").symlink_to(Path(oxpeft.__file__).resolve().parent)
    (Path(site) / "oxpeft-under-test.pth").write_text(str(root / "link") + "\n")
    return python


def test_installed_in_a_virtualenv_pip_sees_it_and_pip_uninstall_removes_it(bare_venv):
    python = str(bare_venv)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    before = sorted(p.name for p in site.iterdir())
    for remover in (["-m", "pip", "uninstall", "-y", "peft"], ["-m", "oxpeft.cli", "alias", "remove"]):
        out = oxpeft_cli("alias", "install", python=python)
        assert out.returncode == 0, out.stderr
        assert f"installed in {site}" in out.stdout
        show = subprocess.run([python, "-m", "pip", "show", "peft"], capture_output=True, text=True)
        assert f"Version: {ALIAS_VERSION}" in show.stdout, show.stdout + show.stderr
        listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
        assert {"name": "peft", "version": ALIAS_VERSION} in json.loads(listed.stdout)
        probe = subprocess.run([python, "-c", "import peft; print(peft.__version__, peft.__oxpeft__)"],
                               capture_output=True, text=True)  # fmt: skip
        assert probe.stdout.split() == [ALIAS_VERSION, oxpeft.__version__], probe.stderr
        out = subprocess.run([python, *remover], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert sorted(p.name for p in site.iterdir()) == before, remover
        gone = subprocess.run([python, "-c", "import peft"], capture_output=True, text=True)
        assert gone.returncode != 0 and "No module named 'peft'" in gone.stderr
