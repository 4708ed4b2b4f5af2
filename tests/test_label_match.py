"""Which scan each LabelMe file labels (platform/bonescan_platform/label_match.py), without Ray:
by relative path in a reader's folder, and every file left out named with its reason."""

from __future__ import annotations

import json
from pathlib import Path

from bonescan_platform.label_match import HIDDEN, Scan, match_labels


def _scans(root: Path) -> list[Scan]:
    (root / "dicom" / "a_site").mkdir(parents=True)
    scans = []
    for name in ("scan0001", "a_site/scan0001"):
        path = root / "dicom" / f"{name}.dcm"
        path.write_bytes(b"")
        scans.append(Scan(name=name, files=(path,)))
    return scans


def test_a_label_at_its_scan_s_relative_path_labels_that_scan_only(tmp_path):
    scans = _scans(tmp_path)
    labels = tmp_path / "labels"
    (labels / "reader1" / "a_site").mkdir(parents=True)
    (labels / "reader1" / "a_site" / "scan0001.json").write_text("{}")
    (labels / "reader1" / "scan0001.json").write_text("{}")
    assigned, rejected = match_labels(labels, scans)
    assert assigned == {0: [labels / "reader1" / "scan0001.json"], 1: [labels / "reader1" / "a_site" / "scan0001.json"]}
    assert rejected == []


def test_hidden_labels_and_folders_are_named_not_skipped_in_silence(tmp_path):
    scans = _scans(tmp_path)
    labels = tmp_path / "labels"
    (labels / "reader1").mkdir(parents=True)
    (labels / "reader1" / "scan0001.json").write_text("{}")
    (labels / "reader1" / ".scan0001.json").write_text("{}")  # an editor's backup
    (labels / ".reader9" / "deep").mkdir(parents=True)
    (labels / ".reader9" / "deep" / "scan0001.json").write_text("{}")
    (labels / "reader1" / ".notes.txt").write_text("not a label either way")
    assigned, rejected = match_labels(labels, scans)
    assert assigned == {0: [labels / "reader1" / "scan0001.json"]}
    assert sorted(str(e) for e in rejected) == sorted(
        f"{p}: {HIDDEN}" for p in (labels / ".reader9", labels / "reader1" / ".scan0001.json"))


def test_a_name_alone_is_no_match_even_with_one_namesake(tmp_path):
    # The top-level scan0001 may be the very scan missing from this export: a_site/scan0001,
    # another patient's, must not take its label.
    scans = _scans(tmp_path)[1:]
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "scan0001.json").write_text("{}")
    assigned, rejected = match_labels(labels, scans)
    assert assigned == {}
    [error] = rejected
    assert error.path == str(labels / "scan0001.json")
    assert "no scan at scan0001" in error.reason and "a_site/scan0001" in error.reason


def test_imagepath_matches_and_a_conflict_with_the_path_labels_neither(tmp_path):
    scans = _scans(tmp_path)
    labels = tmp_path / "labels"
    (labels / "reader1").mkdir(parents=True)
    (labels / "reader2").mkdir()
    other = "../../dicom/a_site/scan0001.dcm"  # from labels/readerN/ to a_site's file
    # reader1: a label named for nothing, found by its imagePath
    (labels / "reader1" / "anything.json").write_text(json.dumps({"imagePath": other}))
    # reader2: at the top-level scan's path, but its imagePath is a_site's: which one is meant?
    (labels / "reader2" / "scan0001.json").write_text(json.dumps({"imagePath": other}))
    assigned, rejected = match_labels(labels, scans)
    assert assigned == {1: [labels / "reader1" / "anything.json"]}
    [error] = rejected
    assert error.path == str(labels / "reader2" / "scan0001.json")
    assert "names scan scan0001 but its imagePath leads to scan a_site/scan0001" in error.reason
