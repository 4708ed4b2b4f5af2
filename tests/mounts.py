"""Real filesystems that refuse writes, for the tests of outputs that cannot be written: a
tmpfs mounted read-only, or small enough to fill. Mounting needs root (CI and the developers'
machines run as root); elsewhere the tests that need one skip and say why."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, *, size_bytes: int, read_only: bool = False):
    """A tmpfs of ``size_bytes`` at ``path`` (made if missing), unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
