"""Finding adapter files: a local directory first, else a Hugging Face Hub repo id (when online)."""

from __future__ import annotations

import os
from typing import Any

from oxpeft._io import check_subfolder

# huggingface_hub download options that loading functions accept and pass on (transformers passes them along).
HUB_DOWNLOAD_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "user_agent", "etag_timeout")


def resolve_file(
    model_id: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    required: bool = True,
    **download: Any,
) -> str | None:
    """Path of `filename` for a local adapter directory or a hub repo id.

    Returns None when `required` is False and the file does not exist; otherwise a missing file is a
    FileNotFoundError that says where it looked. `download` takes huggingface_hub's download options
    (`HUB_DOWNLOAD_OPTIONS`: cache_dir, force_download, local_files_only, proxies, ...), as transformers passes them.
    """
    unknown = sorted(set(download) - set(HUB_DOWNLOAD_OPTIONS))
    if unknown:
        raise TypeError(f"resolve_file: unknown download option(s) {unknown}; known: {list(HUB_DOWNLOAD_OPTIONS)}")
    download = {k: v for k, v in download.items() if v is not None}
    model_id = os.fspath(model_id)
    check_subfolder(subfolder)
    local_dir = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local_dir):
        path = os.path.join(local_dir, filename)
        if os.path.isfile(path):
            return path
        if not required:
            return None
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(model_id) or os.path.isabs(model_id) or model_id.startswith("."):
        if not required:
            return None
        raise FileNotFoundError(f"{local_dir} is not a directory")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = f"hub repo {model_id}" + (f" (revision {revision})" if revision else "")
    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder, revision=revision, token=token, **download)
    except LocalEntryNotFoundError:
        # Offline (HF_HUB_OFFLINE or no network): only the local hub cache was searched.
        if not required:
            return None
        raise FileNotFoundError(
            f"{filename} of {where} is not in the local hub cache and the hub cannot be reached "
            "(offline mode or no network); pass a local directory instead"
        ) from None
    except EntryNotFoundError:
        if not required:
            return None
        raise FileNotFoundError(f"{filename} not found in {where}") from None
    except Exception as exc:  # network errors, unknown repos, offline mode
        if not required:
            return None
        raise FileNotFoundError(
            f"{model_id!r} is neither a local directory nor a reachable hub repo ({type(exc).__name__}: {exc})"
        ) from None
