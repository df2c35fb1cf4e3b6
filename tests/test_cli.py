"""The `oxpeft` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oxpeft
from conftest import make_llama

OXPEFT = shutil.which("oxpeft", path=str(Path(sys.executable).parent)) or shutil.which("oxpeft")


def run(*args: str, umask: int | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    assert OXPEFT, "the oxpeft console script is installed with the package"
    return subprocess.run(
        [OXPEFT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def assert_clean_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 1, one message that says what is wrong, in the command's terms."""
    assert out.returncode == 1, out.stdout + out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "force=True" not in out.stderr and "approximate=True" not in out.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama checkpoint and an oxpeft LoRA adapter for it."""
    root = tmp_path_factory.mktemp("cli")
    make_llama().save_pretrained(root / "base")
    model = oxpeft.get_peft_model(make_llama(), oxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    return {"base": root / "base", "adapter": root / "adapter"}


def test_version_as_a_command_and_as_a_flag():
    for args in (["version"], ["--version"]):
        out = run(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"oxpeft {oxpeft.__version__}"


def test_unmerge_without_a_sidecar_is_refused_unless_approximate(checkpoint, tmp_path):
    # The base was never merged: subtracting the adapter would write a wrong model.
    out = run("unmerge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(tmp_path / "back"), "-q")
    assert_clean_error(out, "no exact-unmerge sidecar", "--approximate")
    assert not (tmp_path / "back").exists() and list(tmp_path.iterdir()) == []

    out = run("unmerge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(tmp_path / "back"), "-q", "--approximate")
    assert out.returncode == 0, out.stderr
    assert "oxpeft unmerge: warning:" in out.stderr and "approximate" in out.stderr
    assert "warnings.warn" not in out.stderr and ".py:" not in out.stderr  # no source line
    assert "APPROXIMATE" in out.stdout and (tmp_path / "back" / "model.safetensors").is_file()


def test_every_writing_command_refuses_an_existing_output_unless_force(checkpoint, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")

    for args in (
        ["merge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(existing), "-q"],
        ["config", "migrate", str(checkpoint["adapter"]), "--to", "0.10.0", "-o", str(existing)],
        ["demo", "--steps", "10", "--output-dir", str(existing)],
    ):
        out = run(*args)
        assert_clean_error(out, f"{existing} already exists", "--force")
        assert [p.name for p in existing.iterdir()] == ["keep.txt"], args

    as_json = tmp_path / "config.json"
    as_json.write_text("{}")
    assert_clean_error(run("config", "migrate", str(checkpoint["adapter"]), "--to", "0.10.0", "-o", str(as_json)), "--force")
    assert as_json.read_text() == "{}"

    out = run("config", "migrate", str(checkpoint["adapter"]), "--to", "0.10.0", "-o", str(existing), "--force")
    assert out.returncode == 0, out.stderr
    assert "use_dora" in json.loads((existing / "adapter_config.json").read_text())
    out = run("merge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(existing), "-q", "--force")
    assert out.returncode == 0, out.stderr
    assert (existing / "model.safetensors").is_file() and not (existing / "keep.txt").exists()


def test_missing_paths_are_named_as_missing(checkpoint, tmp_path):
    missing = tmp_path / "no-such-adapter"
    out = run("merge", str(checkpoint["base"]), str(missing), "-o", str(tmp_path / "out"), "-q")
    assert_clean_error(out, f"{missing}: no such adapter folder")
    assert "adapter_config.json" not in out.stderr

    assert_clean_error(run("config", "check", str(missing)), f"{missing}: no such file or directory")

    out = run("config", "check", str(checkpoint["base"]))
    assert_clean_error(out, f"{checkpoint['base']}: no adapter_config.json in this folder")
    assert out.stderr.count("adapter_config.json") == 1  # said once, not as a path and again as a message


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_merge_output_gets_the_users_umask_like_cp(checkpoint, tmp_path, umask):
    merged = tmp_path / "merged"
    out = run("merge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(merged), "-q", umask=umask)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~umask
    for written in merged.iterdir():
        copied = checkpoint["base"] / written.name
        if copied.is_file() and not written.name.endswith(".safetensors"):
            expected = stat.S_IMODE(copied.stat().st_mode) & ~umask  # cp: the source's mode less the umask
        else:
            expected = (0o777 if written.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(written.stat().st_mode) == expected, written


def test_config_check_names_oxpeft_as_the_writer_and_peft_still_loads_it(checkpoint):
    out = run("config", "check", str(checkpoint["adapter"]))
    assert out.returncode == 0, out.stderr
    assert f"written by:     oxpeft {oxpeft.__version__} (in PEFT 0.21.2's format)" in out.stdout
    saved = json.loads((checkpoint["adapter"] / "adapter_config.json").read_text())
    assert saved["peft_version"] == f"0.21.2+oxpeft.{oxpeft.__version__}"
    peft = pytest.importorskip("peft")
    loaded = peft.PeftConfig.from_pretrained(str(checkpoint["adapter"]))
    assert loaded.peft_version == saved["peft_version"] and loaded.r == 4
    theirs = peft.PeftModel.from_pretrained(make_llama(), str(checkpoint["adapter"]))
    ours = oxpeft.PeftModel.from_pretrained(make_llama(), str(checkpoint["adapter"]))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits)


def test_demo_removes_its_temporary_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = run("demo", "--steps", "10", env={"TMPDIR": str(scratch)})
    assert out.returncode in (0, 1), out.stderr  # 10 steps may not show the loss going down; the folder matters here
    assert "now removed" in out.stdout
    assert list(scratch.iterdir()) == []


def test_a_refused_merge_leaves_no_new_parent_folders(checkpoint, tmp_path):
    # An adapter for a wider model: the merge is refused (shapes) after the output's parents were needed.
    wide = tmp_path / "wide-adapter"
    oxpeft.get_peft_model(make_llama(hidden_size=128, intermediate_size=256), oxpeft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(wide)
    out = run("merge", str(checkpoint["base"]), str(wide), "-o", str(tmp_path / "new1" / "new2" / "OUT"), "-q")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide-adapter"]  # no new1/, no .partial


def test_an_in_place_config_migrate_keeps_the_files_mode(checkpoint, tmp_path):
    import shutil as _shutil
    import stat as _stat

    adapter = tmp_path / "adapter"
    _shutil.copytree(checkpoint["adapter"], adapter)
    config = adapter / "adapter_config.json"
    os.chmod(config, 0o640)
    out = run("config", "migrate", str(adapter), "--to", "0.10.0")
    assert out.returncode == 0, out.stderr
    assert _stat.S_IMODE(config.stat().st_mode) == 0o640
    assert _stat.S_IMODE((adapter / "adapter_config.json.bak").stat().st_mode) == 0o640


class _Pickled:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", ["object", "garbage"])
def test_a_pickle_adapter_that_is_not_plain_tensors_is_one_clear_error(content, checkpoint, tmp_path):
    import shutil as _shutil

    adapter = tmp_path / "adapter"
    _shutil.copytree(checkpoint["adapter"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    if content == "object":
        torch.save({"base_model.model.x": _Pickled()}, adapter / "adapter_model.bin")
    else:
        (adapter / "adapter_model.bin").write_bytes(b"not a pickle at all")
    out = run("merge", str(checkpoint["base"]), str(adapter), "-o", str(tmp_path / "out"), "-q")
    assert_clean_error(out, f"{adapter / 'adapter_model.bin'}: not a plain tensor file")
    assert "weights_only" not in out.stderr and "this must never run" not in out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "manifest, field",
    [
        ("not json at all", "not a valid manifest"),
        ("[1, 2]", "a JSON object is expected"),
        ('{"format": 1, "adapters": 3}', "field 'adapters' must be a list"),
        ('{"format": 1, "adapters": [{"weight": "x"}]}', "field 'adapters[0].weight' must be a finite number"),
    ],
)
def test_a_damaged_manifest_is_one_error_naming_it(manifest, field, checkpoint, tmp_path):
    merged = tmp_path / "merged"
    assert run("merge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(merged), "-q").returncode == 0
    path = merged / "oxpeft-unmerge" / "manifest.json"
    assert path.is_file()
    path.write_text(manifest)
    out = run("unmerge", str(merged), str(checkpoint["adapter"]), "-o", str(tmp_path / "back"), "-q")
    assert_clean_error(out, f"{path}: ", field)
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_among_the_inputs_is_refused_at_once(kind, checkpoint, tmp_path):
    import shutil as _shutil

    base = tmp_path / "base"
    _shutil.copytree(checkpoint["base"], base)
    shard = base / "model.safetensors"
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    else:
        os.symlink("/dev/zero", shard)
    out = run("merge", str(base), str(checkpoint["adapter"]), "-o", str(tmp_path / "out"), "-q", timeout=60)
    assert_clean_error(out, f"{shard}: a {'FIFO' if kind == 'fifo' else 'device'}, not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_an_adapter_declaring_a_huge_tensor_is_refused_before_it_is_read(command, checkpoint, tmp_path):
    """A sparse adapter file whose header declares a 512 GiB lora_A: refused at once by its size (it used to be
    hashed whole first, minutes of reading), leaving nothing."""
    import json as _json
    import shutil as _shutil
    import struct

    adapter = tmp_path / "adapter"
    _shutil.copytree(checkpoint["adapter"], adapter)
    n = 512 << 30
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = _json.dumps({key: {"dtype": "F32", "shape": [n // 4 // 64, 64], "data_offsets": [0, n]}}).encode()
    weights = adapter / "adapter_model.safetensors"
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    os.truncate(weights, 8 + len(header) + n)  # sparse: no disk space used
    source = checkpoint["base"]
    if command == "unmerge":
        source = tmp_path / "merged"
        assert run("merge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(source), "-q").returncode == 0
    out = run(command, str(source), str(adapter), "-o", str(tmp_path / "out"), "-q", timeout=60)
    assert_clean_error(out, f"{weights}: 512.0 GiB, more than twice the whole base checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> dict[str, Path]:
    """A 768 MiB base (48 Linear weights of 2048 x 2048) and a LoRA for it: a merge that runs long enough to be
    stopped while it writes."""
    import json as _json

    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("big")
    (root / "base").mkdir()
    (root / "adapter").mkdir()
    n, layers = 2048, 48
    gen = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(n, n, generator=gen) for i in range(layers)},
              str(root / "base" / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    lora = {}
    for i in range(layers):
        lora[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_A.weight"] = torch.randn(8, n, generator=gen) * 0.01
        lora[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_B.weight"] = torch.randn(n, 8, generator=gen) * 0.01
    save_file(lora, str(root / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["up_proj"]}
    (root / "adapter" / "adapter_config.json").write_text(_json.dumps(config))
    return {"base": root / "base", "adapter": root / "adapter"}


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_merge_and_removes_what_it_created(signum, big_checkpoint, tmp_path):
    """What `kill`, `timeout`, systemd and docker send (SIGTERM) stops a merge like Ctrl-C does: within a second,
    with the partial output folder and the adapters' scratch folder removed."""
    import signal as _signal
    import time as _time

    work = tmp_path / "work"
    scratch = tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    proc = subprocess.Popen(
        [OXPEFT, "merge", str(big_checkpoint["base"]), str(big_checkpoint["adapter"]), "-o", str(work / "OUT"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    deadline = _time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in work.iterdir()):  # the merge is writing
        assert proc.poll() is None and _time.monotonic() < deadline, "the merge ended before it could be stopped"
        _time.sleep(0.001)
    sent = _time.monotonic()
    proc.send_signal(getattr(_signal, signum))
    _, err = proc.communicate(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal arrived (a very fast disk)")
    assert _time.monotonic() - sent < 5
    assert proc.returncode == 128 + getattr(_signal, signum), err
    assert f"stopped by {signum}" in err and "Traceback" not in err
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []


def test_a_dead_runs_partial_output_is_removed_by_the_next_run(checkpoint, tmp_path):
    """After a kill -9 the `.OUT.<pid>.*.partial` folder stays; the next run on OUT removes it if that process is
    gone, and leaves a live process's folder alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".OUT.{dead_pid}.abc123.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    alive = tmp_path / f".OUT.{os.getpid()}.def456.partial"  # this test's own process: alive
    alive.mkdir()
    out = run("merge", str(checkpoint["base"]), str(checkpoint["adapter"]), "-o", str(tmp_path / "OUT"), "-q")
    assert out.returncode == 0, out.stderr
    assert not stale.exists() and alive.is_dir()
    assert (tmp_path / "OUT" / "model.safetensors").is_file()


def test_config_check_of_a_huge_config_prints_a_short_report(tmp_path):
    """A 300,000-entry target_modules and a 2 MB unknown field: each is shown by its start and its size, not
    echoed (a 50 MB config used to print ~100 MB)."""
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": [f"module_{i}" for i in range(300_000)],
        "my_notes": "x" * 2_000_000,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    out = run("config", "check", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) < 2000, out.stdout[:3000]
    assert '["module_0", "module_1", "module_2", ...] (300,000 entries)' in out.stdout
    assert "(2,000,002 characters)" in out.stdout
