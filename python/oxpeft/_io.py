"""Crash-safe file writes: write to a temporary name in the same folder, fsync, then rename into place.

Temporary files and folders are private (mode 0600 / 0700) while they are written; what is renamed into
place gets the mode the user's umask gives a new file or folder, as `cp` and `open` would.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`, on error removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o666))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)` and move its output to `path` only if it succeeds."""
    with atomic_path(path) as tmp:
        writer(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(mode: int) -> int:
    """`mode` (0o666 for a file, 0o777 for a folder) less the umask's bits: what `open` / `mkdir` would give."""
    return mode & ~current_umask()


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """Raise FileExistsError if `path` exists and not `force` (the CLI turns `force=True` into `--force`)."""
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{os.fspath(path)} already exists (pass force=True to replace it)")


def check_adapter_name(name: object) -> str:
    """An adapter name is used as a state-dict key part and as a folder name (`save_pretrained` writes every
    adapter but `default` into `save_directory/<name>`): a non-empty string without '.', path separators or NUL.
    Anything else (`"/tmp/x"`, `".."`, `"a\\0b"`) is a ValueError, before anything changes."""
    bad = (".", "/", "\\", "\0") + ((os.sep,) if os.sep not in "/\\" else ())
    if not isinstance(name, str) or not name or any(ch in name for ch in bad):
        raise ValueError(
            f"invalid adapter name {name!r}: use a non-empty name without '.', '/', '\\\\' or NUL "
            "(it becomes a folder name when saving)"
        )
    return name


def check_subfolder(subfolder: str | None) -> str | None:
    """A `subfolder` argument must stay inside the folder or repo it is relative to: a relative path without
    '..' components or NUL (None and '' mean no subfolder)."""
    if not subfolder:
        return subfolder
    if not isinstance(subfolder, str) or "\0" in subfolder or os.path.isabs(subfolder) or subfolder.startswith(("/", "\\")):
        raise ValueError(f"invalid subfolder {subfolder!r}: give a relative path inside the adapter folder or repo")
    if any(part == ".." for part in subfolder.replace("\\", "/").split("/")):
        raise ValueError(f"invalid subfolder {subfolder!r}: '..' would leave the adapter folder or repo")
    return subfolder


def make_parents(path: str | os.PathLike) -> list[str]:
    """Create the missing parent folders of `path` (mode per the umask) and return those created, outermost
    first, so that a failed operation can remove them again (`remove_created`)."""
    missing: list[str] = []
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    created: list[str] = []
    for folder in reversed(missing):
        os.mkdir(folder)
        created.append(folder)
    return created


def remove_created(folders: list[str]) -> None:
    """Remove folders `make_parents` created, innermost first, as far as they are still empty."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            break
