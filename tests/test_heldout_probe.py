"""A held-out probe (issue 26) through `bonescan ingest`, run as a user runs it: a subprocess
whose stdout is strict UTF-8, joined to the session's Ray. One folder holds study folders,
labels by other names and cases, and broken or identifying headers beside good scans; it is
ingested once and each test reads its part of the outcome. No identifying value may reach
the output, the shards, the report or Ray's logs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

import broken_corpus
import mounts
from bonescan_model.io.deid import keyed_hash
from bonescan_model.io.dicom import PatientIdentity, write_whole_body
from bonescan_model.io.labelme import write_labelme
from bonescan_model.synth import write_cohort
from bonescan_platform import shards
from bonescan_platform.cli import main

pytestmark = pytest.mark.ray

PHI_ID = "PHI-123456"
PHI_UID = "1.2.840.19470723.1"  # a UID that holds a birth date, made invalid by a trailing letter
BAD_NAME = os.fsdecode(b"bad\xffname\nx.dcm")
LESION = np.array([[50, 50], [50, 60], [60, 60], [60, 50]], float)  # (row, col) on the crop
BENIGN = np.array([[150, 150], [150, 160], [160, 160], [160, 150]], float)


def _identity(i: int) -> PatientIdentity:
    return PatientIdentity(patient_id=f"PROBE-{i}", patient_name="Probe^Pat", birth_date="19470723",
                           study_date="20240303", study_uid=pydicom.uid.generate_uid(),
                           series_uid=pydicom.uid.generate_uid())


def _study_folder(folder: Path, seed: int) -> list[Path]:
    """A two-view scan as a clinic's study folder holds it: ANT.dcm and POST.dcm."""
    files = write_whole_body(folder, "x", broken_corpus._counts(seed), broken_corpus._counts(seed + 1),
                             identity=_identity(seed), layout="two-files")
    return [f.rename(folder / f.name.removeprefix("x_")) for f in files]


def _label(path: Path, *shapes: tuple[str, np.ndarray]) -> None:
    """A LabelMe file drawn on the 256x256 crop, its shapes labelled as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_labelme(path, [s for _, s in shapes], (256, 256), "crop.png")
    body = json.loads(path.read_text())
    for shape, (label, _) in zip(body["shapes"], shapes):
        shape["label"] = label
    path.write_text(json.dumps(body))


def _key(secret: bytes, path: Path) -> str:
    with pydicom.config.disable_value_validation():  # the test's own reads warn of no value
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return keyed_hash(secret, ds.StudyInstanceUID, ds.SeriesInstanceUID)


def _edit(path: Path, **header) -> None:
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(path)
        for k, v in header.items():
            setattr(ds, k, v)
        ds.save_as(path)


def _ingest(ray_local, dicom: Path, labels: Path | None, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    args = [sys.executable, "-m", "bonescan_platform.cli", "ingest", "--dicom", str(dicom), "--out", str(out)]
    return subprocess.run(args + (["--labels", str(labels)] if labels else []), capture_output=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def probe(tmp_path_factory, ray_local, deid_secret):
    root = tmp_path_factory.mktemp("heldout")
    write_cohort(root / "cohort", 4, seed=31)
    dicom, labels = root / "cohort" / "dicom", root / "cohort" / "labels"
    made = {}
    # 1. study folders: their labels are at the folder's path; a namesake elsewhere takes none
    made["P0004"] = _study_folder(dicom / "P0004", 40)
    made["namesake"] = broken_corpus.scan(dicom / "other_site", "P0004", 42)
    made["site_b/P0006"] = _study_folder(dicom / "site_b" / "P0006", 44)
    made["P0005_folder"] = _study_folder(dicom / "P0005", 46)
    made["P0005_file"] = broken_corpus.scan(dicom, "P0005", 48)
    for reader in ("reader1", "reader2"):
        _label(labels / reader / "P0004.json", ("lesion", LESION))
    _label(labels / "reader1" / "site_b" / "P0006.json", ("lesion", LESION))
    _label(labels / "reader1" / "P0005.json", ("lesion", LESION))
    # 4. a label file in capitals; a reader's benign shape beside a lesion
    made["upper"] = broken_corpus.scan(dicom, "upper", 50)
    _label(labels / "reader1" / "upper.JSON", ("lesion", LESION))
    made["benign"] = broken_corpus.scan(dicom, "benign", 52)
    _label(labels / "reader1" / "benign.json", ("lesion", LESION), ("benign_degenerative", BENIGN))
    made["only_benign"] = broken_corpus.scan(dicom, "only_benign", 54)
    _label(labels / "reader1" / "only_benign.json", ("Benign Degenerative", BENIGN))
    # 2. a header value that cannot be decoded (PatientID's VR made FL), naming no value
    made["badvr"] = broken_corpus.scan(dicom, "badvr", 56, PatientID=PHI_ID)
    data = made["badvr"].read_bytes()
    at = data.find(b"\x10\x00\x20\x00LO")
    made["badvr"].write_bytes(data[:at + 4] + b"FL" + data[at + 6:])
    # 3. a UID pydicom finds invalid (it warns with the value): a good scan all the same
    made["baduid"] = broken_corpus.scan(dicom, "baduid", 58)
    _edit(made["baduid"], SeriesInstanceUID=PHI_UID + "x", StudyInstanceUID=PHI_UID + "y")
    # 2. a file name that is not UTF-8 and holds a newline: a good scan
    made["bad_name"] = broken_corpus.scan(dicom, "bad_name", 60).rename(dicom / BAD_NAME)
    (dicom / os.fsdecode(b"notes\xfe\n.txt")).write_text("not a scan")  # rejected, so printed
    # 2. a mis-merged series (ANT of one patient, POST of another) and a palette-colour image
    merged = write_whole_body(dicom, "merged", broken_corpus._counts(62), broken_corpus._counts(63),
                              identity=_identity(62), layout="two-files")
    _edit(merged[1], PatientID="PROBE-OTHER")
    made["merged"] = merged
    made["palette"] = broken_corpus.scan(dicom, "palette", 64, PhotometricInterpretation="PALETTE COLOR")
    out = root / "shards"
    done = _ingest(ray_local, dicom, labels, out)
    manifest = shards.read_manifest(out) if (out / shards.MANIFEST).exists() else {}
    rows = {r["scan_key"]: r for p in shards.shard_paths(out) for r in pq.read_table(p).to_pylist()} if manifest else {}
    return {"root": root, "dicom": dicom, "labels": labels, "out": out, "made": made, "done": done,
            "stdout": done.stdout.decode("utf-8"), "stderr": done.stderr.decode("utf-8"),
            "report": manifest.get("report", {}), "rows": rows, "secret": deid_secret.read_bytes()}


def _reason(entries: list[dict], path) -> str:
    found = [e["reason"] for e in entries if e["file"] == str(path)]
    assert found, f"{path} is not named; named: {[e['file'] for e in entries]}"
    return found[0]


def test_the_ingest_ends_cleanly(probe):
    assert probe["done"].returncode == 0, probe["stderr"][-3000:]
    assert "Traceback" not in probe["stderr"] + probe["stdout"]


def test_study_folders_are_labeled_at_their_folders_path(probe):  # item 1
    rows, secret, made = probe["rows"], probe["secret"], probe["made"]
    for study in ("P0004", "site_b/P0006"):
        row = rows[_key(secret, made[study][0])]
        assert row["readers_agree"] is True and row["mask"] is not None
        assert np.frombuffer(row["mask"], np.uint8).reshape(256, 256)[52:58, 52:58].all()
    assert rows[_key(secret, made["namesake"])]["readers_agree"] is None  # other_site/P0004 takes no label
    # P0005/ (a study folder) and P0005.dcm share one name: the label fits both, so labels neither
    reason = _reason(probe["report"]["label_errors"], probe["labels"] / "reader1" / "P0005.json")
    assert "fits 2 scans (P0005, P0005)" in reason
    assert rows[_key(secret, made["P0005_folder"][0])]["readers_agree"] is None
    assert rows[_key(secret, made["P0005_file"])]["readers_agree"] is None


def test_labels_mean_what_they_say(probe):  # item 4
    rows, secret, made = probe["rows"], probe["secret"], probe["made"]
    assert rows[_key(secret, made["upper"])]["readers_agree"] is True  # upper.JSON is read
    mask = np.frombuffer(rows[_key(secret, made["benign"])]["mask"], np.uint8).reshape(256, 256)
    assert mask[52:58, 52:58].all() and not mask[145:165, 145:165].any()  # the benign shape is not a lesion
    reason = _reason(probe["report"]["label_errors"], probe["labels"] / "reader1" / "benign.json")
    assert "shapes[1] 'benign_degenerative': not a lesion label" in reason
    only = rows[_key(secret, made["only_benign"])]
    assert only["readers_agree"] is True and not np.frombuffer(only["mask"], np.uint8).any()


def test_one_bad_file_costs_only_itself(probe):  # item 2
    rejected, made = probe["report"]["rejected"], probe["made"]
    assert _reason(rejected, made["badvr"]) == ("header element (0010,0020) (PatientID) cannot be decoded: its "
                                                "bytes do not fit its value representation")
    assert "2 different patients" in _reason(rejected, made["merged"][0])
    assert "PALETTE COLOR" in _reason(rejected, made["palette"])
    good = [made["baduid"], made["bad_name"], made["upper"], made["benign"], made["namesake"]]
    for path in good:
        assert _key(probe["secret"], path) in probe["rows"], path
    # 4 of the cohort, 3 study folders, other_site/P0004 and P0005.dcm, upper, benign, only_benign, baduid, bad_name
    assert probe["report"]["scans_ingested"] == 4 + 3 + 2 + 5
    assert {Path(r["file"]).name for r in rejected} == {"badvr.dcm", "merged_ANT.dcm", "palette.dcm",
                                                       "notes\\xfe\\n.txt"}


def test_a_name_that_is_not_utf8_is_printed_on_one_line(probe):  # item 2
    assert str(probe["dicom"] / "bad\\xffname\\nx.dcm") in [s["file"] for s in probe["report"]["scans"]]
    line = f"  {probe['dicom']}/notes\\xfe\\n.txt: not a DICOM file"
    assert any(printed.startswith(line) for printed in probe["stdout"].splitlines()), probe["stdout"]


def test_no_identifying_value_reaches_any_output_or_log(probe, ray_local):  # item 3
    secrets = [PHI_ID, "19470723", "Probe^Pat", "PROBE-", "BROKEN-99117", "Broken^Bob"]
    texts = {"stdout": probe["stdout"], "stderr": probe["stderr"]}
    for path in probe["out"].rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    assert len(texts) > 10
    for where, text in texts.items():
        for value in secrets:
            assert value not in text, f"{value!r} in {where}"


def test_predict_of_a_folder_with_a_name_that_is_not_utf8(probe, tmp_path, capsys):  # item 2, predict on Ray
    from bonescan_model.checkpoint import save_checkpoint
    from bonescan_model.network import ModelConfig, build_model

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(probe["dicom"] / BAD_NAME, folder / BAD_NAME)
    shutil.copy(probe["made"]["upper"], folder / "upper.dcm")
    config = ModelConfig(width=4, recurrence=1)
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model(config), config)
    code = main(["predict", "--checkpoint", str(checkpoint), "--dicom", str(folder), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert "predicted 2 scan(s)" in captured.out
    assert (tmp_path / "out" / os.fsdecode(b"bad\xffname\nx.overlay.png")).is_file()


def test_an_ingest_that_fills_the_disk_leaves_no_orphan_shard(probe, ray_local, tmp_path):  # item 6
    good = tmp_path / "good"
    good.mkdir()
    for name in ("upper", "benign"):  # two patients: one train shard, one test shard
        shutil.copy(probe["made"][name], good / f"{name}.dcm")
    reference = tmp_path / "reference"
    assert _ingest(ray_local, good, None, reference).returncode == 0
    page = 4096
    sizes = sorted(math.ceil((reference / s["file"]).stat().st_size / page) * page
                   for s in shards.read_manifest(reference)["shards"])
    assert len(sizes) == 2
    # Room for the larger shard or the smaller, never both: whichever task writes second fails.
    with mounts.tmpfs(tmp_path / "full", size_bytes=sizes[0] + sizes[1] - page) as full:
        done = _ingest(ray_local, good, None, full / "shards")
        err = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "cannot be written (No space left on device)" in lines[0], err
        assert os.listdir(full / "shards") == []  # no shard, no temporary, no manifest
