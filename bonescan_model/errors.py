"""The one error type for bad input: it names the file and the reason, on one line."""

from __future__ import annotations

import os
import re


REASON_LIMIT = 1000


class InputError(ValueError):
    """A file that cannot be used, and why. ``str(err)`` is ``"<path>: <reason>"``, one line of
    printable text: ``path`` is kept as ``shown(path)`` gives it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = shown(path)
        # One line, always: reasons built from library messages may carry newlines. And a short
        # one: a reason that quotes a user's value (a 50 MB YAML string) is cut.
        reason = " ".join(str(reason).split())
        self.reason = reason if len(reason) <= REASON_LIMIT else f"{reason[:REASON_LIMIT]}... (cut)"
        super().__init__(f"{self.path}: {self.reason}")


def shown(path: str | os.PathLike | bytes) -> str:
    """A file name as one printable line: bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which a UTF-8 stream refuses to print) become ``\\xNN``, and a newline, tab or
    other control character becomes its escape, so a name never splits a one-line message.
    A name that needs neither is returned as it is."""
    text = os.fsdecode(path)
    if text.isprintable():
        return text
    text = os.fsencode(text).decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# What an error message may quote of a user's value: enough to recognise it, never the whole of
# a 50 MB string (or a header value that may identify a patient).
QUOTE_LIMIT = 60


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with its full length said where it is longer."""
    text = repr(value) if not isinstance(value, str) or len(value) <= 10 * limit else repr(value[: 2 * limit])
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else type(value).__name__
    return f"{text[:limit]}... ({size})"


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
