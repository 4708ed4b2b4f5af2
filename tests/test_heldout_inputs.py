"""Held-out inputs that broke bonescan (issue 26), through the CLI, without Ray: bad shards,
checkpoints and configs, outputs that cannot be written, and predict's file names. Each
must fail in one line naming the file (exit 2), before Ray would start, leaving nothing
behind. The ingest probe that needs Ray is tests/test_heldout_probe.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.data  # noqa: F401 - at collection: Ray's and Ray Data's log handlers bind the stderr of
# their import, which must not be one test's capsys (closed after it; later Ray jobs log to it)
import yaml

import broken_corpus
import mounts
from bonescan_model.checkpoint import save_checkpoint, write_file
from bonescan_model.errors import InputError, shown
from bonescan_model.io.dicom import scan_path
from bonescan_model.network import ModelConfig, build_model
from bonescan_platform import shards
from bonescan_platform.cli import main
from one_line import fails as _fails
from tiny import tiny_config

TINY = ModelConfig(width=4, recurrence=1, dilations=(1, 2))


@pytest.fixture(autouse=True)
def no_ray_starts(monkeypatch):
    """Starting Ray fails the test: each error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)


def _row(split: str, mask: bytes | None = None) -> dict:
    image = shards.encode_image(np.zeros((256, 256)), "<u2")
    return {"patient_key": "p", "scan_key": f"s-{split}", "ant": image, "post": image, "mask": mask,
            "crop_box": [0, 0, 256, 256], "pixel_spacing_mm": 2.26, "readers_agree": None,
            "source": "dicom", "split": split, "views": "ANT+POST"}


def _shard_folder(folder: Path, train_mask: bytes | None = None) -> Path:
    folder.mkdir()
    written = [shards.write_shard([_row("train", train_mask)], folder / "train-00000.parquet"),
               shards.write_shard([_row("test")], folder / "test-00000.parquet")]
    shards.write_manifest(folder, written, {})
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return _shard_folder(tmp_path / "shards")


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "model.pt", build_model(TINY), TINY)


# ---------------------------------------------------------------- item 5: shards
def test_a_truncated_shard_is_named_by_train_and_evaluate(capsys, tmp_path, data, config, checkpoint):
    shard = data / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(capsys, "train", "--data", data, "--config", config, "--out", tmp_path / "run",
           path=shard, words="not what the shard manifest (_manifest.json) recorded")
    assert not (tmp_path / "run").exists()
    _fails(capsys, "evaluate", "--checkpoint", checkpoint, "--data", data, path=shard, words="SHA-256 differs")


def test_a_shard_of_the_right_schema_with_a_small_mask_is_named(capsys, tmp_path, config, checkpoint):
    # Written with its true checksum, as a tool of someone else's would: the content is wrong.
    data = _shard_folder(tmp_path / "shards", train_mask=bytes(128 * 128))
    _fails(capsys, "train", "--data", data, "--config", config, "--out", tmp_path / "run",
           path=data / "train-00000.parquet", words="mask column holds a 16384-byte image, expected 65536")


def test_a_parquet_file_that_is_not_a_shard_is_named(capsys, tmp_path, config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), folder / "train-00000.parquet")
    data = (folder / "train-00000.parquet").read_bytes()
    import hashlib

    (folder / shards.MANIFEST).write_text(json.dumps({"shards": [
        {"file": "train-00000.parquet", "split": "train", "rows": 2, "sha256": hashlib.sha256(data).hexdigest()}]}))
    _fails(capsys, "train", "--data", folder, "--config", config, "--out", tmp_path / "run",
           path=folder / "train-00000.parquet", words="not a bonescan shard: no column patient_key")


# ---------------------------------------------------------------- item 5: checkpoints
@pytest.mark.parametrize("meta, words", [
    (None, "its meta is NoneType, not a mapping"),
    ({"threshold": 50}, "its threshold 50 is not a probability"),
    ({"threshold": "0.5"}, "its threshold '0.5' is not a probability"),
    ({"train_config": {"threshold": 0.0}}, "its threshold 0.0 is not a probability"),
    ({"train_config": None}, "train_config is not a mapping"),
])
def test_a_checkpoint_with_bad_meta_is_refused(capsys, tmp_path, data, meta, words):
    blob = {"model_config": TINY.__dict__ | {"dilations": list(TINY.dilations)},
            "state_dict": build_model(TINY).state_dict(), "meta": meta}
    path = write_file(tmp_path / "model.pt", blob)
    _fails(capsys, "evaluate", "--checkpoint", path, "--data", data, path=path, words=words)
    _fails(capsys, "predict", "--checkpoint", path, "--dicom", tmp_path, "--out", tmp_path / "out",
           path=path, words=words)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 5: configs
def test_a_model_no_machine_holds_is_refused_before_ray(capsys, tmp_path, data):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model={"width": 4194304})))
    _fails(capsys, "train", "--data", data, "--config", path, "--out", tmp_path / "run",
           path=path, words="ModelConfig: width must be an int in 4..512, got 4194304")
    assert not (tmp_path / "run").exists()


def test_a_model_that_would_not_fit_this_machine_is_refused_before_ray(capsys, tmp_path, data):
    # Within every bound, yet a step of it holds far more than this machine (or any of today's).
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model={"width": 512, "dilations": [1, 2, 4, 8]}, batch_size=1024)))
    line = _fails(capsys, "train", "--data", data, "--config", path, "--out", tmp_path / "run",
                  path=path, words="model.width 512 with batch_size 1024: a training step would hold about")
    assert "more than this machine's memory" in line
    assert not (tmp_path / "run").exists()


def test_a_huge_config_value_is_quoted_short(capsys, tmp_path, data):
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"epochs": "x" * 900_000}))  # under the file bound, a 900 kB value
    line = _fails(capsys, "train", "--data", data, "--config", path, "--out", tmp_path / "run",
                  path=path, words="epochs: expected int, got str 'xxx")
    assert len(line) < 400 and "900,000 characters" in line


def test_a_50_mb_config_is_refused_unread(capsys, tmp_path, data):
    path = tmp_path / "big.yaml"
    path.write_text("epochs: " + "9" * (50 << 20) + "\n")
    line = _fails(capsys, "train", "--data", data, "--config", path, "--out", tmp_path / "run",
                  path=path, words="larger than any config file")
    assert len(line) < 400


def test_a_billion_laughs_config_is_refused(capsys, tmp_path, data):
    path = tmp_path / "laughs.yaml"
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    path.write_text("\n".join(levels) + "\n")
    _fails(capsys, "train", "--data", data, "--config", path, "--out", tmp_path / "run",
           path=path, words="its aliases (*name) stand for more than 100,000 values")
    space = tmp_path / "space.yaml"
    space.write_text("\n".join(levels) + "\n")
    _fails(capsys, "tune", "--data", data, "--space", space, "--out", tmp_path / "exp",
           path=space, words="stand for more than")


# ---------------------------------------------------------------- item 6: outputs that cannot be written
UNDER_PROC = Path("/proc/bonescan-test/out")


def test_outputs_under_proc_fail_first(capsys, tmp_path, data, config, checkpoint):
    cohort = tmp_path / "in"
    broken_corpus.scan(cohort, "good", 3)
    _fails(capsys, "ingest", "--dicom", cohort, "--out", UNDER_PROC, path=UNDER_PROC, words="cannot be written")
    _fails(capsys, "predict", "--checkpoint", checkpoint, "--dicom", cohort, "--out", UNDER_PROC,
           path=UNDER_PROC, words="cannot be written")
    _fails(capsys, "train", "--data", data, "--config", config, "--out", UNDER_PROC,
           path=UNDER_PROC, words="cannot be written")
    target = UNDER_PROC / "metrics.json"
    _fails(capsys, "evaluate", "--checkpoint", checkpoint, "--data", data, "--json", target,
           path=target, words="cannot be written")


def test_outputs_on_a_read_only_mount_fail_first(capsys, tmp_path, data, config, checkpoint):
    cohort = tmp_path / "in"
    broken_corpus.scan(cohort, "good", 3)
    with mounts.tmpfs(tmp_path / "ro", size_bytes=1 << 20, read_only=True) as ro:
        out = ro / "out"
        for args in (["ingest", "--dicom", cohort, "--out", out],
                     ["predict", "--checkpoint", checkpoint, "--dicom", cohort, "--out", out],
                     ["train", "--data", data, "--config", config, "--out", out]):
            _fails(capsys, *args, path=out, words="cannot be written (Read-only file system)")
        _fails(capsys, "evaluate", "--checkpoint", checkpoint, "--data", data, "--json", out / "m.json",
               path=out / "m.json", words="Read-only file system")
        assert os.listdir(ro) == []


def test_predict_on_a_full_disk_leaves_no_half_output(capsys, tmp_path, checkpoint):
    cohort = tmp_path / "in"
    broken_corpus.scan(cohort, "good", 3)
    with mounts.tmpfs(tmp_path / "full", size_bytes=64 << 10) as full:
        (full / "filler").write_bytes(b"\0" * (60 << 10))  # room for the probe, not for a scan's outputs
        code = main(["predict", "--checkpoint", str(checkpoint), "--dicom", str(cohort), "--out", str(full / "out")])
        out = capsys.readouterr().out
        assert code == 2
        assert f"  {cohort / 'good.dcm'}: its outputs could not be written (No space left on device)" in out
        assert sorted(os.listdir(full / "out")) == []


def test_a_checkpoint_on_a_full_disk_is_one_line_and_no_temporary(tmp_path):
    with mounts.tmpfs(tmp_path / "full", size_bytes=16 << 10) as full:
        blob = {"model_config": {}, "state_dict": build_model(TINY).state_dict(), "meta": {}}
        with pytest.raises(InputError, match="model.pt: cannot be written"):
            write_file(full / "model.pt", blob)
        assert os.listdir(full) == []


# ---------------------------------------------------------------- item 2: predict's inputs
def test_predict_names_a_symlink_loop_and_predicts_the_good_scan(capsys, tmp_path, checkpoint):
    folder = tmp_path / "in"
    broken_corpus.scan(folder, "good", 5)
    os.symlink(folder / "loop", folder / "loop")
    os.symlink(folder, folder / "again")  # a folder reached twice
    code = main(["predict", "--checkpoint", str(checkpoint), "--dicom", str(folder), "--out", str(folder / "out")])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert f"  {folder / 'loop'}: symbolic link loop" in captured.out
    assert (folder / "out" / "good.overlay.png").is_file()


def test_predict_a_file_name_that_is_not_utf8_under_a_strict_utf8_stdout(tmp_path, checkpoint):
    folder = tmp_path / "in"
    good = broken_corpus.scan(folder, "good", 7)
    name = os.fsdecode(b"bad\xffname\nx.dcm")
    good.rename(folder / name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-m", "bonescan_platform.cli", "predict", "--checkpoint", str(checkpoint),
                           "--dicom", str(folder), "--out", str(tmp_path / "out")],
                          capture_output=True, env=env, timeout=300)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert "  bad\\xffname\\nx " in out  # one line, the bytes escaped
    assert (tmp_path / "out" / os.fsdecode(b"bad\xffname\nx.overlay.png")).is_file()


def test_a_name_is_shown_on_one_printable_line():
    assert shown(os.fsdecode(b"a/b\xff\nc.dcm")) == "a/b\\xff\\nc.dcm"
    assert shown("plain/name.dcm") == "plain/name.dcm"
    assert str(InputError(os.fsdecode(b"x\n\xfe.json"), "bad")) == "x\\n\\xfe.json: bad"


# ---------------------------------------------------------------- item 1: a study folder's name
def test_a_scan_named_after_its_study_folder_is_at_the_folders_path(tmp_path):
    root = tmp_path / "dicom"
    assert scan_path([root / "P0004" / "ANT.dcm", root / "P0004" / "POST.dcm"], root) == "P0004"
    assert scan_path([root / "site" / "P0006" / "ANT.dcm", root / "site" / "P0006" / "POST.dcm"], root) == "site/P0006"
    assert scan_path([root / "P0004" / "P0004_ANT.dcm", root / "P0004" / "P0004_POST.dcm"], root) == "P0004/P0004"
    assert scan_path([root / "P0004" / "IM0001.dcm"], root) == "P0004/IM0001"
    assert scan_path([root / "scan0001.dcm"], root) == "scan0001"
