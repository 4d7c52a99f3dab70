"""Atomic output files: write to a temporary file beside the target, then rename onto it, so a failure never
leaves a half-written file at the target path.

Also the early checks the command line and the demo run before any work (``check_writable``) and the
folders they create for outputs (``make_parents`` / ``remove_dirs``).

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


def check_writable(path, what: str = "output file") -> None:
    """Fail early, before any work, if ``path`` cannot be written (its folder may not exist yet, but then the
    nearest existing ancestor must be a writable folder)."""
    from .errors import ConfigError

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {what} {path}: it is a folder; give a file name")
    probe = os.path.dirname(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"cannot write {what} {path}: {probe} is a file, not a folder")
    try:  # os.access says yes to root on a read-only mount, so really try
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".fxprune-write-test-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: folder {probe} is not writable ({e.strerror})") from e


def make_parents(path) -> list:
    """Create the missing folders above ``path``; return the ones created (deepest last) so they can be undone."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created = []
    for d in reversed(missing):
        os.mkdir(d)
        created.append(d)
    return created


def remove_dirs(created: list) -> None:
    """Undo ``make_parents``: remove the folders it created, deepest first, where still empty."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)
