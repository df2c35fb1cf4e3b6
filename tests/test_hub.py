"""Adapters named by a hub repo id resolve through huggingface_hub's cache, offline.

No network is reachable from the test machines, so each test lays out a real huggingface_hub cache
folder (refs/<revision> -> commit, snapshots/<commit>/files) with adapters HF PEFT saved, points
huggingface_hub at it in offline mode, and loads by repo id: the same lookup a user's online
download ends with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import oxpeft
from conftest import make_llama, logits, twin

peft = pytest.importorskip("peft", reason="HF PEFT saves the adapters these tests load (pip install '.[test]')")
hub_constants = pytest.importorskip("huggingface_hub.constants")

REPO = "oxpeft-tests/tiny-llama-lora"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _publish(cache: Path, revision: str, save) -> None:
    """Saves into the snapshot folder of `revision` the way a download would have left it."""
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    commit = COMMITS[revision]
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    save(repo_dir / "snapshots" / commit)


def _peft_adapter(base, seed: int, **kwargs):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    return peft.get_peft_model(twin(base), config).eval()


def test_load_by_repo_id_revision_and_subfolder(hub_cache):
    base = make_llama()
    x = torch.randint(0, 256, (2, 8))
    main, v1 = _peft_adapter(base, 1), _peft_adapter(base, 2, lora_alpha=16)
    _publish(hub_cache, "main", lambda d: main.save_pretrained(d))
    _publish(hub_cache, "v1", lambda d: v1.save_pretrained(d / "adapters" / "chat"))

    ours = oxpeft.PeftModel.from_pretrained(twin(base), REPO)
    torch.testing.assert_close(logits(ours, x), logits(main, x), atol=1e-5, rtol=0)

    ours.load_adapter(REPO, adapter_name="chat", revision="v1", subfolder="adapters/chat")
    ours.set_adapter("chat")
    torch.testing.assert_close(logits(ours, x), logits(v1, x), atol=1e-5, rtol=0)
    assert oxpeft.PeftConfig.from_pretrained(REPO, revision="v1", subfolder="adapters/chat").lora_alpha == 16


def test_unknown_repo_or_missing_file_is_a_clear_error(hub_cache):
    base = make_llama()
    with pytest.raises(FileNotFoundError, match="not in the local hub cache and the hub cannot be reached"):
        oxpeft.PeftModel.from_pretrained(twin(base), "oxpeft-tests/does-not-exist")
    # A snapshot with a config but no weights file.
    def config_only(d: Path) -> None:
        _peft_adapter(base, 1).save_pretrained(d)
        for f in d.glob("adapter_model.*"):
            f.unlink()

    _publish(hub_cache, "main", config_only)
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        oxpeft.PeftModel.from_pretrained(twin(base), REPO)
