"""The one error type for bad input: it names the file and the reason, on one line."""

from __future__ import annotations

import os
import re


class InputError(ValueError):
    """A file that cannot be used, and why. ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        # One line, always: reasons built from library messages may carry newlines.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


# A quoted value or a long run of digits in a library's message about a DICOM header may be a
# patient's name, ID, birth date or a UID; where no dataset is at hand to scrub its own values
# from the message, these are blanked instead (the message still says what went wrong).
_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")
_DIGITS = re.compile(r"\d[\d.]{4,}")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message; its type's name when it has none."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def describe(err: BaseException, *, redact: bool = False) -> str:
    """``"<Type>: <first line of its message>"`` (at most 300 characters) for an error nobody
    foresaw, so the reason is named rather than only its type. redact: blank quoted values and
    long digit runs (for messages about DICOM headers, see above)."""
    line = first_line(err)
    if redact:
        line = _DIGITS.sub("#", _QUOTED.sub("'...'", line))
    text = line if line == type(err).__name__ else f"{type(err).__name__}: {line}"
    return text[:300]
