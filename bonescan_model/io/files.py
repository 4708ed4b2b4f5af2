"""The files under an input folder, and a reason for every entry that is not read.

Ingest and predict both take a folder as a clinic hands it over: hidden files, links that
point nowhere or back at themselves and folders named like files all occur, and each is
reported (``<path>: <reason>``) instead of being passed over without a word.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from bonescan_model.errors import InputError


def find_files(root: str | os.PathLike, exclude: str | os.PathLike | None = None
               ) -> tuple[list[Path], list[InputError]]:
    """(every regular file under ``root``, sorted; one InputError per entry left out).

    ``root`` may be a single file. Links to files and folders are followed; a folder reached
    a second time (a link loop, or a second link to it) is searched once. Entries under
    ``exclude`` (a command's own output folder inside its input) are left out without a line.
    Raises InputError when ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        reason = "symbolic link to nothing" if root.is_symlink() else "no such file or folder"
        raise InputError(root, reason)
    if not root.is_dir():
        return [root], []
    # os.path.realpath, not Path.resolve: resolve raises RuntimeError on a symlink loop, which
    # find_files reports as an entry left out rather than dying on it.
    skip = Path(os.path.realpath(exclude)) if exclude is not None else None
    files: list[Path] = []
    left_out: list[InputError] = []
    searched: set[tuple[int, int]] = set()
    folders = [root]
    while folders:
        folder = folders.pop()
        info = folder.stat()
        if (info.st_dev, info.st_ino) in searched:
            left_out.append(InputError(folder, "link to a folder that is already searched (a loop or a "
                                               "second way in); not searched again"))
            continue
        searched.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            left_out.append(InputError(folder, f"cannot list this folder ({err.strerror})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if skip is not None:
                real = Path(os.path.realpath(path))
                if real == skip or skip in real.parents:
                    continue
            if entry.name.startswith("."):
                kind = "folder" if _is_dir(entry) else "file"
                left_out.append(InputError(path, f"hidden {kind} (its name starts with '.'), not read"))
                continue
            try:
                if entry.is_dir():
                    if entry.name.lower().endswith(".dcm"):
                        left_out.append(InputError(path, "is a folder, not a DICOM file (the files in "
                                                         "it are searched like any folder's)"))
                    folders.append(path)
                elif entry.is_file():
                    files.append(path)
                else:
                    left_out.append(_not_a_file(path))
            except OSError:
                left_out.append(_not_a_file(path))
    return sorted(files), sorted(left_out, key=lambda e: e.path)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _not_a_file(path: Path) -> InputError:
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return InputError(path, "symbolic link loop (it leads back to itself), not read")
        if path.is_symlink():
            return InputError(path, "symbolic link to nothing (its target is missing), not read")
        return InputError(path, f"cannot be read ({err.strerror})")
    return InputError(path, "not a regular file (a pipe, socket or device), not read")
