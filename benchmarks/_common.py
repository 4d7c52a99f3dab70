"""Shared by the benchmark scripts: the commit a result was measured at, and atomic result files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fxprune.fileio import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short HEAD, with '+dirty' when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a checkout: say so in the result instead of failing the run
        return "unknown"


def write_json_atomic(path: Path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_bytes_atomic(path: Path, write) -> None:
    """write(tmp_path) then rename into place."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
