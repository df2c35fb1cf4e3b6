"""Crash-safe file writes: write to a temporary name in the same folder, fsync, then rename into place."""

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
