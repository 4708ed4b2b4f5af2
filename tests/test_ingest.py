"""`bonescan ingest` end to end on a real local Ray: synth -> DICOM -> shards -> read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from skimage.io import imread

import broken_corpus
from bonescan_model.io.deid import keyed_hash
from bonescan_model.io.labelme import delta_a
from bonescan_model.preprocess import crop, mirror, thoracic_crop_box
from bonescan_model.synth import synth_patient, write_cohort
from bonescan_platform import shards
from bonescan_platform.ingest import REPORT, ingest

SEED, PATIENTS = 5, 10


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_local, deid_secret):
    root = tmp_path_factory.mktemp("ingest")
    summary = write_cohort(root / "cohort", PATIENTS, seed=SEED)
    broken_corpus.build(root / "cohort" / "dicom" / "broken")
    bad_reader = root / "cohort" / "labels" / "reader4"
    bad_reader.mkdir()
    broken_corpus.build_bad_labels(bad_reader, ["scan0001", "scan0002"])
    out = root / "shards"
    code = ingest(str(root / "cohort" / "dicom"), str(out), str(root / "cohort" / "labels"))
    return {"root": root, "out": out, "code": code, "summary": summary, "secret": deid_secret.read_bytes(),
            "report": json.loads((out / REPORT).read_text())}


def _rows(out: Path) -> list[dict]:
    return [row for path in shards.shard_paths(out) for row in pq.read_table(path).to_pylist()]


def test_good_scans_ingest_beside_broken_ones(ingested):
    report = ingested["report"]
    assert ingested["code"] == 0
    assert report["scans_ingested"] == PATIENTS
    reasons = {Path(r["file"]).name: r["reason"] for r in report["rejected"]}
    for name, words in broken_corpus.EXPECTED.items():
        if name == "three_ANT.dcm":  # the series is rejected as a whole, named by its first file
            assert any("3 views" in r for r in reasons.values()), reasons
        else:
            assert words in reasons[name], (name, reasons.get(name))
    label_reasons = {Path(r["file"]).name: r["reason"] for r in report["label_errors"]}
    assert "JSON" in label_reasons["scan0001.json"] and "circle" in label_reasons["scan0002.json"]
    assert all("\n" not in r["reason"] for r in report["rejected"] + report["label_errors"])


def test_round_trip_matches_what_synth_wrote(ingested):
    secret, rows = ingested["secret"], _rows(ingested["out"])
    by_key = {row["scan_key"]: row for row in rows}
    assert len(by_key) == PATIENTS
    disagreeing = set(ingested["summary"].disagreeing_scans)
    for index in range(PATIENTS):
        patient = synth_patient(SEED, index)
        row = by_key[keyed_hash(secret, patient.identity.study_uid, patient.identity.series_uid)]
        box = thoracic_crop_box(patient.ant)
        assert tuple(row["crop_box"]) == box
        np.testing.assert_array_equal(shards.decode_image(row["ant"], "<u2"), crop(patient.ant, box))
        np.testing.assert_array_equal(shards.decode_image(row["post"], "<u2"), crop(mirror(patient.post), box))
        assert row["views"] == "ANT+POST" and row["source"] == "dicom"
        assert row["pixel_spacing_mm"] == pytest.approx(2.26)
        truth = crop(imread(ingested["root"] / "cohort" / "truth" / f"{patient.name}.mask.png") > 0, box)
        if patient.name in disagreeing:
            assert row["mask"] is None and row["readers_agree"] is False
        else:
            assert row["readers_agree"] is True
            assert delta_a(shards.decode_image(row["mask"], "u1") > 0, truth) <= 0.05


def test_split_is_per_patient(ingested):
    rows = _rows(ingested["out"])
    train = {r["patient_key"] for r in rows if r["split"] == "train"}
    test = {r["patient_key"] for r in rows if r["split"] == "test"}
    assert train and test and not train & test
    # Rejected scans' patients were split too (the split is decided from headers, before
    # pixels are read), so the share among ingested patients is near, not exactly, 30 %.
    assert 0.15 <= len(test) / (len(train) + len(test)) <= 0.45


def test_rerun_gives_the_same_shards_and_no_duplicates(ingested, tmp_path):
    out = ingested["out"]
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    manifest = shards.read_manifest(out)
    assert sum(s["rows"] for s in manifest["shards"]) == PATIENTS
    cohort = ingested["root"] / "cohort"
    assert ingest(str(cohort / "dicom"), str(out), str(cohort / "labels")) == 0
    after = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert after == before
    assert [s["sha256"] for s in shards.read_manifest(out)["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert not list(out.glob(".*tmp"))


def test_no_patient_identifier_reaches_any_output(ingested, capsys):
    identities = [synth_patient(SEED, i).identity for i in range(PATIENTS)] + [broken_corpus.IDENTITY]
    needles = {v for ident in identities for v in ident.__dict__.values() if len(v) >= 6}
    needles |= {n.replace("^", " ") for n in needles if "^" in n}
    outputs = [p.read_bytes() for p in ingested["out"].rglob("*") if p.is_file()]
    assert outputs
    for needle in needles:
        assert not any(needle.encode() in blob for blob in outputs), needle
    assert ingested["secret"] not in b"".join(outputs)


def test_real_ge_scan_ingests(ray_local, deid_secret, tmp_path):
    folder = tmp_path / "ge"
    folder.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("JPEG2000.dcm"), folder / "ge_wholebody.dcm")
    assert ingest(str(folder), str(tmp_path / "out")) == 0
    (row,) = _rows(tmp_path / "out")
    assert row["views"] == "ANT" and row["post"] is None and row["mask"] is None
    assert row["readers_agree"] is None and row["split"] == "train"
    ant = shards.decode_image(row["ant"], "<u2")
    assert ant.shape == (256, 256) and ant.sum() > 0.4 * pydicom.dcmread(folder / "ge_wholebody.dcm").pixel_array.clip(0).sum()


def test_nothing_ingested_exits_2(ray_local, deid_secret, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no scans here")
    assert ingest(str(tmp_path / "in"), str(tmp_path / "out")) == 2
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["scans_ingested"] == 0 and "not a DICOM file" in report["rejected"][0]["reason"]
