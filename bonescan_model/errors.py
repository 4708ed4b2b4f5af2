"""The one error type for bad input: it names the file and the reason, on one line."""

from __future__ import annotations

import os


class InputError(ValueError):
    """A file that cannot be used, and why. ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        # One line, always: reasons built from library messages may carry newlines.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")
