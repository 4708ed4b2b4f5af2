"""Which LabelMe file labels which scan: each label goes to exactly one scan, or is rejected.

A labels folder holds either the LabelMe files of one reader or one folder per reader
(``reader1/``, ``reader2/``, ...), never both. Within a reader's files a label finds its scan
by, in this order:

1. its path relative to the reader's folder: ``a_site/scan0002.json`` labels the scan
   ``a_site/scan0002`` of the DICOM folder (a scan is named as ``dicom.scan_path`` names it:
   in the sub-folder of its first file, or, for a study folder ``P0004/`` of ``ANT.dcm`` and
   ``POST.dcm``, at the folder's own path, so ``reader1/P0004.json`` labels it);
2. its LabelMe ``imagePath``, when that leads (from the label's folder) to a file of a scan.

Nothing else: a name alone is no match, even when one scan has it, because another patient's
scan of that name (``a_site/scan0002`` beside ``scan0002``) may be the one that is missing.
A label whose path and imagePath lead to two different scans, or that fits none, is rejected
with the scans it could mean named, never given to one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bonescan_model.errors import InputError


@dataclass(frozen=True)
class Scan:
    """A scan as the matcher knows it: ``name`` is its relative name (``a_site/scan0002``),
    ``files`` its DICOM files."""

    name: str
    files: tuple[Path, ...]


def reader_folders(labels: Path) -> list[Path]:
    """The folder of each reader; ``labels`` itself when it holds one reader's files."""
    if not labels.is_dir():
        raise InputError(labels, "labels folder does not exist" if not labels.exists() else
                         "is a file, not a labels folder")
    entries = [p for p in labels.iterdir() if not p.name.startswith(".")]
    folders = sorted(p for p in entries if p.is_dir())
    files = sorted(p for p in entries if p.is_file() and p.suffix.lower() == ".json")
    if folders and files:
        raise InputError(labels, f"holds both LabelMe files ({files[0].name}, ...) and folders "
                                 f"({', '.join(f.name + '/' for f in folders[:3])}): a labels folder is "
                                 "either one reader's LabelMe files or one folder per reader")
    return folders or [labels]


def match_labels(labels: Path | None, scans: list[Scan]) -> tuple[dict[int, list[Path]], list[InputError]]:
    """({index of a scan in ``scans``: its label files, one per reader}, rejected labels)."""
    if labels is None:
        return {}, []
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}  # only to name what a label that fits no scan may mean
    by_file: dict[Path, int] = {}
    for i, scan in enumerate(scans):
        by_name.setdefault(scan.name, []).append(i)
        by_stem.setdefault(scan.name.rsplit("/", 1)[-1], []).append(i)
        for f in scan.files:
            by_file[f.resolve()] = i
    assigned: dict[int, list[Path]] = {}
    rejected: list[InputError] = [InputError(p, HIDDEN) for p in _hidden(labels)]
    for folder in reader_folders(labels):
        mine: dict[int, Path] = {}  # this reader's label of each scan
        for path in _label_files(folder, nested=folder != labels):
            relative = path.relative_to(folder).with_suffix("").as_posix()
            by_path, by_image = by_name.get(relative, []), _by_image_path(path, by_file)
            candidates = by_path or by_image
            if by_path and by_image and by_path != by_image:
                rejected.append(InputError(path, f"its path names scan {scans[by_path[0]].name} but its imagePath "
                                                 f"leads to scan {scans[by_image[0]].name}, so it labels neither: "
                                                 "move the label or correct its imagePath"))
            elif not candidates:
                namesakes = ", ".join(scans[i].name for i in by_stem.get(path.stem, []))
                rejected.append(InputError(path, f"no scan at {relative} and no scan file at its imagePath"
                                                 + (f" (scans of this name elsewhere: {namesakes}; put the label "
                                                    "at its scan's relative path in the reader's folder or set "
                                                    "its imagePath to the scan's DICOM file)" if namesakes else "")))
            elif len(candidates) > 1:
                names = ", ".join(scans[i].name for i in candidates)
                rejected.append(InputError(path, f"fits {len(candidates)} scans ({names}), so it labels none: "
                                                 "set its imagePath to the scan's DICOM file"))
            elif candidates[0] in mine:
                rejected.append(InputError(path, f"a second label from this reader for scan "
                                                 f"{scans[candidates[0]].name} (the first: {mine[candidates[0]]})"))
            else:
                mine[candidates[0]] = path
        for i, path in mine.items():
            assigned.setdefault(i, []).append(path)
    return assigned, rejected


HIDDEN = "hidden (its name starts with '.'), so not read as a label"


def _hidden(labels: Path) -> list[Path]:
    """The LabelMe files and folders under ``labels`` that a leading '.' hides (named in the
    report, as ingest names every DICOM entry it leaves out); inside a hidden folder, the folder."""
    found = []
    for path in sorted(labels.rglob(".*")):
        if any(part.startswith(".") for part in path.relative_to(labels).parts[:-1]):
            continue  # inside a hidden folder: the folder is named
        if path.is_dir() or path.suffix.lower() == ".json":
            found.append(path)
    return found


def _label_files(folder: Path, nested: bool) -> list[Path]:
    """The LabelMe files of one reader: ``.json`` in any case (``P0004.JSON`` too)."""
    found = folder.rglob("*") if nested else folder.glob("*")
    return sorted(p for p in found if p.suffix.lower() == ".json" and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _by_image_path(path: Path, by_file: dict[Path, int]) -> list[int]:
    """The scan whose file the label's imagePath leads to, if any. A label that cannot be
    read is matched by its path alone; reading it for the scan reports why."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        image = data.get("imagePath") if isinstance(data, dict) else None
        scan = by_file.get((path.parent / image).resolve()) if isinstance(image, str) and image else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, RuntimeError):  # read_labelme names the reason
        return []
    return [] if scan is None else [scan]
