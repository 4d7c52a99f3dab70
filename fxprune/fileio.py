"""Atomic output files: write to a temporary file beside the target, then rename onto it, so a failure never
leaves a half-written file at the target path.

Example::

    atomic_write("slim.pt", lambda tmp: torch.save(payload, tmp))
    atomic_write_text("results.json", json.dumps(rows))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Optional


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: str, suffix: str = ".tmp") -> str:
    """A new empty temporary file in ``path``'s folder (so ``os.replace`` onto ``path`` is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the final file the usual permissions
    return tmp


def remove(path: Optional[str]) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def atomic_write(path, write: Callable[[str], None], suffix: str = ".tmp") -> str:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it onto ``path``; on any failure remove
    the temporary file and leave ``path`` as it was."""
    path = os.fspath(path)
    tmp = temp_beside(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)
