"""A new user's probe (issue 15) through the CLI: each bad input beside good scans is named on
one line with its reason, and the good scans are still ingested (or predicted).

One folder holds them all and is ingested once (`bonescan ingest` through cli.main, on the
session's Ray); each test then reads its part of the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

import broken_corpus
from bonescan_model.checkpoint import save_checkpoint
from bonescan_model.io.deid import keyed_hash
from bonescan_model.network import ModelConfig, build_model
from bonescan_model.synth import synth_patient, write_cohort
from bonescan_platform import shards
from bonescan_platform.cli import main

pytestmark = pytest.mark.ray

SEED, PATIENTS = 21, 6


def _key(secret: bytes, path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return keyed_hash(secret, ds.StudyInstanceUID, ds.SeriesInstanceUID)


def _cohort_key(secret: bytes, index: int) -> str:
    identity = synth_patient(SEED, index).identity
    return keyed_hash(secret, identity.study_uid, identity.series_uid)


def _rows(out: Path) -> dict[str, dict]:
    return {r["scan_key"]: r for p in shards.shard_paths(out) for r in pq.read_table(p).to_pylist()}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def probe(tmp_path_factory, ray_local, deid_secret):
    root = tmp_path_factory.mktemp("probe")
    write_cohort(root / "cohort", PATIENTS, seed=SEED)
    dicom, labels = root / "cohort" / "dicom", root / "cohort" / "labels"
    made = {}
    # 1. transfer syntaxes pydicom does not know
    made["jpegxl"] = broken_corpus.scan(dicom, "jpegxl", 10)
    broken_corpus.set_transfer_syntax(made["jpegxl"], broken_corpus.JPEG_XL)
    made["private_ts"] = broken_corpus.scan(dicom, "private_ts", 12)
    broken_corpus.set_transfer_syntax(made["private_ts"], "1.2.826.0.1.3680043.99.1")
    # 2. another patient's scan with a labeled scan's file name; two scans of one name
    made["other_scan0003"] = broken_corpus.scan(dicom / "a_site", "scan0003", 14)
    made["twin_b"] = broken_corpus.scan(dicom / "b_site", "twin", 16)
    made["twin_c"] = broken_corpus.scan(dicom / "c_site", "twin", 18)
    shutil.copy(labels / "reader1" / "scan0004.json", labels / "reader1" / "twin.json")
    # 4. a byte-identical backup of scan0000 and a cut-off copy of scan0002, in their series
    (dicom / "backup").mkdir()
    for f in dicom.glob("scan0000*.dcm"):
        shutil.copy(f, dicom / "backup" / f.name)
    (dicom / "partial").mkdir()
    cut = sorted(dicom.glob("scan0002*.dcm"))[0]
    (dicom / "partial" / cut.name).write_bytes(cut.read_bytes()[: cut.stat().st_size * 3 // 4])
    made["cut"] = dicom / "partial" / cut.name
    # 5. labels that overflow a float or nest past the recursion limit
    (labels / "reader1" / "scan0001.json").write_text(json.dumps({
        "shapes": [{"label": "lesion", "shape_type": "polygon", "points": [[10**400, 5], [20, 5], [20, 30]]}],
        "imageHeight": 1024, "imageWidth": 256, "imagePath": "scan0001_ANT.png"}))
    (labels / "reader2" / "scan0005.json").write_text("[" * 100_000 + "]" * 100_000)
    # 8. headers that must not reach the shards
    made["spacing_inf"] = broken_corpus.scan(dicom, "spacing_inf", 20, PixelSpacing=["inf", "inf"])
    made["spacing_huge"] = broken_corpus.scan(dicom, "spacing_huge", 22, PixelSpacing=["1e30", "1e30"])
    made["bits1"] = broken_corpus.scan(dicom, "bits1", 24, BitsAllocated=1, BitsStored=1, HighBit=0)
    made["frames0"] = broken_corpus.scan(dicom, "frames0", 26, NumberOfFrames=0)
    # 9. entries that used to be passed over without a line
    made["no_body"] = broken_corpus.no_body(dicom, "no_body")
    (dicom / ".hidden.dcm").write_text("hidden")
    os.symlink(dicom / "nowhere.dcm", dicom / "gone.dcm")
    os.symlink(dicom / "loop.dcm", dicom / "loop.dcm")
    (dicom / "folder.dcm").mkdir()
    out = root / "shards"
    code = main(["ingest", "--dicom", str(dicom), "--labels", str(labels), "--out", str(out)])
    return {"root": root, "dicom": dicom, "labels": labels, "out": out, "code": code, "made": made,
            "secret": deid_secret.read_bytes(), "report": shards.read_manifest(out)["report"],
            "rows": _rows(out)}


def _reason(entries: list[dict], path: Path) -> str:
    found = [e["reason"] for e in entries if Path(e["file"]) == path]
    assert found, f"{path} is not named; named: {[e['file'] for e in entries]}"
    return found[0]


def test_the_good_scans_are_all_ingested(probe):
    good = [_cohort_key(probe["secret"], i) for i in range(PATIENTS)]
    good += [_key(probe["secret"], probe["made"][k]) for k in ("other_scan0003", "twin_b", "twin_c")]
    assert probe["code"] == 0
    assert sorted(probe["rows"]) == sorted(good)
    assert probe["report"]["scans_ingested"] == len(good)


def test_unknown_transfer_syntax_rejects_that_file_only(probe):  # item 1
    rejected = probe["report"]["rejected"]
    assert "transfer syntax 1.2.840.10008.1.2.4.110" in _reason(rejected, probe["made"]["jpegxl"])
    assert "transfer syntax 1.2.826.0.1.3680043.99.1" in _reason(rejected, probe["made"]["private_ts"])


def test_a_label_goes_to_its_own_scan_or_to_none(probe):  # item 2
    rows, secret = probe["rows"], probe["secret"]
    # labels/readerN/scan0003.json is the top-level scan0003's, not a_site/scan0003's
    assert rows[_cohort_key(secret, 3)]["readers_agree"] is not None
    assert rows[_key(secret, probe["made"]["other_scan0003"])]["readers_agree"] is None
    reason = _reason(probe["report"]["label_errors"], probe["labels"] / "reader1" / "twin.json")
    assert "no scan at twin" in reason and "b_site/twin" in reason and "c_site/twin" in reason
    for twin in ("twin_b", "twin_c"):
        assert rows[_key(secret, probe["made"][twin])]["readers_agree"] is None


def test_a_copy_beside_the_original_leaves_the_original_in(probe):  # item 4
    rows, secret, dicom = probe["rows"], probe["secret"], probe["dicom"]
    assert _cohort_key(secret, 0) in rows and _cohort_key(secret, 2) in rows
    rejected = probe["report"]["rejected"]
    for copy in (dicom / "backup").iterdir():
        assert "a copy of the image in" in _reason(rejected, copy)
    reason = _reason(rejected, probe["made"]["cut"])
    assert "truncated" in reason and "a copy of the image in" in reason


def test_a_malformed_label_rejects_the_label_not_the_scan(probe):  # item 5
    errors, labels = probe["report"]["label_errors"], probe["labels"]
    assert "too large" in _reason(errors, labels / "reader1" / "scan0001.json")
    assert "nested too deeply" in _reason(errors, labels / "reader2" / "scan0005.json")
    rows = probe["rows"]
    for index in (1, 5):  # still in, labeled by the other readers
        assert rows[_cohort_key(probe["secret"], index)]["readers_agree"] is not None
    assert not any(Path(r["file"]).suffix == ".dcm" and "Error" in r["reason"] for r in probe["report"]["rejected"])


def test_implausible_headers_are_rejected(probe):  # item 8 (DICOM)
    rejected, made = probe["report"]["rejected"], probe["made"]
    assert "PixelSpacing inf mm" in _reason(rejected, made["spacing_inf"])
    assert "PixelSpacing 1e30 mm" in _reason(rejected, made["spacing_huge"])
    assert "BitsAllocated is 1" in _reason(rejected, made["bits1"])
    assert "NumberOfFrames is 0" in _reason(rejected, made["frames0"])
    assert all(0 < r["pixel_spacing_mm"] < 10 for r in probe["rows"].values())


def test_every_entry_left_out_is_named(probe):  # item 9
    rejected, dicom = probe["report"]["rejected"], probe["dicom"]
    assert "hidden" in _reason(rejected, dicom / ".hidden.dcm")
    assert "symbolic link to nothing" in _reason(rejected, dicom / "gone.dcm")
    assert "symbolic link loop" in _reason(rejected, dicom / "loop.dcm")
    assert "is a folder" in _reason(rejected, dicom / "folder.dcm")
    assert "no body found" in _reason(rejected, probe["made"]["no_body"])


def test_the_report_prints_file_colon_reason(probe, capsys, tmp_path):  # item 9
    # A second ingest of the same folder prints the same report; its lines are checked here.
    code, out, err = _cli(capsys, "ingest", "--dicom", str(probe["dicom"]), "--labels", str(probe["labels"]),
                          "--out", str(tmp_path / "again"))
    assert code == 0 and "Traceback" not in err
    for entry in probe["report"]["rejected"] + probe["report"]["label_errors"]:
        assert f"  {entry['file']}: {entry['reason']}" in out.splitlines()


def test_predict_names_the_unknown_syntax_and_predicts_the_good_scan(probe, capsys, tmp_path):  # item 1
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(probe["made"]["jpegxl"], folder / "jpegxl.dcm")
    shutil.copy(probe["made"]["twin_b"], folder / "good.dcm")
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model(ModelConfig(width=4, recurrence=1)),
                                 ModelConfig(width=4, recurrence=1))
    code, out, err = _cli(capsys, "predict", "--checkpoint", str(checkpoint), "--dicom", str(folder),
                          "--out", str(tmp_path / "out"))
    assert code == 0 and "Traceback" not in err
    assert f"  {folder / 'jpegxl.dcm'}: transfer syntax 1.2.840.10008.1.2.4.110" in out
    assert (tmp_path / "out" / "good.mask.png").is_file()


@pytest.mark.parametrize("name", ["jpegxl", "bits1", "no_body"])
def test_a_folder_of_one_bad_file_exits_2_naming_it(probe, capsys, tmp_path, name):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(probe["made"][name], folder / f"{name}.dcm")
    code, out, err = _cli(capsys, "ingest", "--dicom", str(folder), "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    assert f"  {folder / name}.dcm: " in out


# ---------------------------------------------------------------- item 6: the labels folder's layout
def test_labels_of_one_reader_beside_a_folder_is_an_error(probe, capsys, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(probe["labels"] / "reader1" / "scan0000.json", labels / "scan0000.json")
    (labels / "empty").mkdir()
    code, out, err = _cli(capsys, "ingest", "--dicom", str(probe["dicom"]), "--labels", str(labels),
                          "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith(f"error: {labels}: holds both LabelMe files") and "empty/" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_labels_of_one_reader_without_folders_label_their_scans(probe, capsys, tmp_path):
    dicom, labels = tmp_path / "dicom", tmp_path / "labels"
    dicom.mkdir()
    labels.mkdir()
    for f in probe["dicom"].glob("scan0000*.dcm"):
        shutil.copy(f, dicom / f.name)
    shutil.copy(probe["labels"] / "reader1" / "scan0000.json", labels / "scan0000.json")
    code, out, err = _cli(capsys, "ingest", "--dicom", str(dicom), "--labels", str(labels), "--out", str(tmp_path / "out"))
    assert code == 0
    (row,) = _rows(tmp_path / "out").values()
    assert row["readers_agree"] is True and row["mask"] is not None


# ---------------------------------------------------------------- item 3: nothing it did not write
def _listed(out: Path) -> dict[str, str]:
    return {s["file"]: s["sha256"] for s in shards.read_manifest(out)["shards"]}


def test_reingest_never_deletes_what_it_did_not_write(probe, capsys, tmp_path):
    good, bad, out = tmp_path / "good", tmp_path / "bad", tmp_path / "shards"
    good.mkdir()
    bad.mkdir()
    for name in ("twin_b", "twin_c"):
        shutil.copy(probe["made"][name], good / f"{name}.dcm")
    assert _cli(capsys, "ingest", "--dicom", str(good), "--out", str(out))[0] == 0
    before = _listed(out)
    assert sum(r["rows"] for r in shards.read_manifest(out)["shards"]) == 2
    unrelated = {"results.parquet": b"PAR1 not ours PAR1", "notes.txt": b"mine"}
    for name, data in unrelated.items():
        (out / name).write_bytes(data)

    # An ingest that ingests nothing leaves the folder as it was.
    shutil.copy(probe["made"]["jpegxl"], bad / "jpegxl.dcm")
    shutil.copy(probe["made"]["bits1"], bad / "bits1.dcm")
    code, text, err = _cli(capsys, "ingest", "--dicom", str(bad), "--out", str(out))
    assert code == 2 and "left as they were" in text and "Traceback" not in err
    assert _listed(out) == before and len(_rows(out)) == 2
    assert all((out / name).read_bytes() == data for name, data in unrelated.items())

    # One good scan: the new set replaces the old one; only the old set's shards are retired.
    (good / "twin_c.dcm").unlink()
    assert _cli(capsys, "ingest", "--dicom", str(good), "--out", str(out))[0] == 0
    after = _listed(out)
    assert len(_rows(out)) == 1 and set(before) - set(after)
    assert not any((out / name).exists() for name in set(before) - set(after))
    assert all((out / name).read_bytes() == data for name, data in unrelated.items())
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted([*after, "results.parquet"])
