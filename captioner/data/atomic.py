"""Files written beside their final name and renamed into place: a reader, or a run that was
killed while writing, finds the old file or the whole new one, never a torn one. Standard library
only, so that dataset indexing and evaluation use it without loading a model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def plain_mode(bits: int) -> int:
    """The permissions a plain write gives (`bits`: 0o666 for a file, 0o777 for a folder) under this
    process's umask; temporary files and folders are made private, and what they become is not."""
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


def atomic_file(path: str | Path, write, suffix: str = ".tmp") -> Path:
    """Runs `write(tmp_path)` on a temporary file beside `path`, then renames it into place, so a
    reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, plain_mode(0o666))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
