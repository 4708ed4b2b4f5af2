"""The CLI's contract for bad input, checked in one place: exit 2, one line on stderr naming the
file, no traceback."""

from __future__ import annotations

from pathlib import Path

from bonescan_platform.cli import main


def fails(capsys, *args, path: Path | str, words: str) -> str:
    """Run the CLI; it must exit 2 with one line `error: <path>: ...` holding ``words``. Returns the line."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    assert words in lines[0], err
    return lines[0]
