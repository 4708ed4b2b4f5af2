"""Bad arguments and files given to the CLI: one line `error: <path>: <reason>`, exit 2, no
traceback, and all of it before Ray starts (issue 15, items 7 and 8). No test here needs Ray:
every one of these must fail before it would start."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bonescan_model.checkpoint import save_checkpoint
from bonescan_model.network import ModelConfig, build_model
from bonescan_platform import shards
from one_line import fails as _fails
from tiny import tiny_config

TINY = ModelConfig(width=4, recurrence=1, dilations=(1, 2))


def _row(split: str) -> dict:
    image = shards.encode_image(np.zeros((256, 256)), "<u2")
    return {"patient_key": "p", "scan_key": f"s-{split}", "ant": image, "post": image, "mask": None,
            "crop_box": [0, 0, 256, 256], "pixel_spacing_mm": 2.26, "readers_agree": None,
            "source": "dicom", "split": split, "views": "ANT+POST"}


@pytest.fixture
def data(tmp_path) -> Path:
    """A small shard folder, written without Ray."""
    folder = tmp_path / "shards"
    folder.mkdir()
    written = [shards.write_shard([_row(split)], folder / f"{split}-00000.parquet") for split in ("train", "test")]
    shards.write_manifest(folder, written, {})
    return folder


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    return path


@pytest.fixture(autouse=True)
def no_ray_starts(monkeypatch):
    """Starting Ray fails the test: each error must come first."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)


# ---------------------------------------------------------------- train
def test_train_out_an_existing_file(capsys, tmp_path, data, config):
    (tmp_path / "run").write_text("a file")
    _fails(capsys, "train", "--data", data, "--config", config, "--out", tmp_path / "run",
           path=tmp_path / "run", words="is a file")


def test_train_on_shards_without_training_rows(capsys, tmp_path, config):
    empty = tmp_path / "empty"
    empty.mkdir()
    shards.write_manifest(empty, [], {})
    _fails(capsys, "train", "--data", empty, "--config", config, "--out", tmp_path / "run",
           path=empty, words="0 rows")


@pytest.mark.parametrize("body, words", [("[]", "not a shard manifest"), ("{", "not a readable shard manifest"),
                                         (b"\xff\xfe{", "not a readable shard manifest")])
def test_train_on_a_manifest_that_is_not_one(capsys, tmp_path, config, body, words):
    folder = tmp_path / "shards"
    folder.mkdir()
    manifest = folder / shards.MANIFEST
    manifest.write_bytes(body if isinstance(body, bytes) else body.encode())
    _fails(capsys, "train", "--data", folder, "--config", config, "--out", tmp_path / "run",
           path=manifest, words=words)


def test_train_on_a_manifest_naming_a_missing_shard(capsys, tmp_path, data, config):
    (data / "train-00000.parquet").unlink()
    _fails(capsys, "train", "--data", data, "--config", config, "--out", tmp_path / "run",
           path=data / "train-00000.parquet", words="missing")


def test_train_data_a_file(capsys, tmp_path, config):
    (tmp_path / "shards.parquet").write_text("x")
    _fails(capsys, "train", "--data", tmp_path / "shards.parquet", "--config", config, "--out", tmp_path / "run",
           path=tmp_path / "shards.parquet", words="not a shard folder")


@pytest.mark.parametrize("content, words", [
    (b"epochs: 2\n# caf\xe9\n", "not UTF-8"),  # Latin-1, as an editor may save it
    (b"", "empty"),
    (b"# every key commented out\n", "empty"),
    (b"epochs: 2\nlr: 0.001\nepochs: 3\n", "duplicate key 'epochs'"),
    (b"lr: .inf\n", "lr: must be a finite number"),
    (b"lr: .nan\n", "lr: must be a finite number"),
    (b"batch_size: 100000000000000000000\n", "batch_size: 100000000000000000000 is out of range"),
    (b"alpha: 100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     b"000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     b"000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     b"0000000000000000000000000000000000000000000\n", "alpha: must be a finite number"),
])
def test_train_config_that_is_not_valid(capsys, tmp_path, data, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    _fails(capsys, "train", "--data", data, "--config", path, "--out", tmp_path / "run", path=path, words=words)
    assert not (tmp_path / "run").exists()


def test_train_config_a_folder(capsys, tmp_path, data):
    _fails(capsys, "train", "--data", data, "--config", tmp_path, "--out", tmp_path / "run",
           path=tmp_path, words="is a folder")


# ---------------------------------------------------------------- tune
def _space(tmp_path: Path, base: Path, parameters: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "parameters": parameters}))
    return path


def test_tune_range_with_an_infinite_end(capsys, tmp_path, data, config):
    space = _space(tmp_path, config, {"lr": {"uniform": [0.1, float("inf")]}})
    _fails(capsys, "tune", "--data", data, "--space", space, "--out", tmp_path / "exp",
           path=space, words="parameters.lr.uniform: both ends must be finite")


def test_tune_space_a_folder(capsys, tmp_path, data):
    (tmp_path / "spaces").mkdir()
    _fails(capsys, "tune", "--data", data, "--space", tmp_path / "spaces", "--out", tmp_path / "exp",
           path=tmp_path / "spaces", words="is a folder")


def test_tune_base_that_is_not_utf8(capsys, tmp_path, data):
    base = tmp_path / "base.yaml"
    base.write_bytes(b"epochs: 2\n# caf\xe9\n")
    space = _space(tmp_path, base, {"lr": {"grid": [0.001, 0.002]}})
    _fails(capsys, "tune", "--data", data, "--space", space, "--out", tmp_path / "exp", path=base, words="not UTF-8")


def test_tune_grid_too_large_fails_at_once(capsys, tmp_path, data, config):
    values = [round(0.0001 * (i + 1), 6) for i in range(60)]
    space = _space(tmp_path, config, {"lr": {"grid": values}, "alpha": {"grid": values},
                                      "nu": {"grid": values}, "weight_decay": {"grid": values}})
    start = time.perf_counter()
    _fails(capsys, "tune", "--data", data, "--space", space, "--out", tmp_path / "exp",
           path=space, words="the grid makes 12960000 trials")
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- checkpoints
def _checkpoint(path: Path, blob: dict) -> Path:
    torch.save(blob, path)
    return path


@pytest.mark.parametrize("kind", ["mismatched", "no_state_dict", "python_objects"])
def test_predict_with_a_checkpoint_that_is_not_one(capsys, tmp_path, kind):
    config = dataclasses.asdict(TINY)
    blob = {
        "mismatched": {"model_config": config, "state_dict": build_model(dataclasses.replace(TINY, width=8)).state_dict()},
        "no_state_dict": {"model_config": config},
        "python_objects": {"model_config": config, "state_dict": {}, "meta": argparse.Namespace(a=1)},
    }[kind]
    path = _checkpoint(tmp_path / "model.pt", blob)
    words = {"mismatched": "weights do not fit", "no_state_dict": "no model_config and state_dict",
             "python_objects": "argparse.Namespace"}[kind]
    line = _fails(capsys, "predict", "--checkpoint", path, "--dicom", tmp_path, "--out", tmp_path / "out",
                  path=path, words=words)
    assert "weights_only" not in line


# ---------------------------------------------------------------- report
def test_report_out_a_folder(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "report.html").mkdir()
    save_checkpoint(run / "model.pt", build_model(TINY), TINY)
    _fails(capsys, "report", "--experiment", run, "--out", tmp_path / "report.html",
           path=tmp_path / "report.html", words="is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "run"]


# ---------------------------------------------------------------- the site secret
@pytest.mark.parametrize("kind", ["short", "folder"])
def test_ingest_with_a_secret_that_is_not_one(capsys, tmp_path, monkeypatch, kind):
    secret = tmp_path / "secret"
    if kind == "short":
        secret.write_bytes(b"short")
    else:
        secret.mkdir()
    monkeypatch.setenv("BONESCAN_SECRET_FILE", str(secret))
    (tmp_path / "dicom").mkdir()
    _fails(capsys, "ingest", "--dicom", tmp_path / "dicom", "--out", tmp_path / "out", path=secret,
           words={"short": "holds 5 bytes", "folder": "is a folder"}[kind])


def test_the_console_script_prints_one_line(tmp_path, config):
    """The same through a real process: `python -m bonescan_platform.cli`, as `bonescan` runs."""
    (tmp_path / "run").write_text("a file")
    done = subprocess.run([sys.executable, "-m", "bonescan_platform.cli", "train", "--data", str(tmp_path),
                           "--config", str(config), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {tmp_path / shards.MANIFEST}: no shard manifest here; run " \
                                  "`bonescan ingest` first"


@pytest.mark.parametrize("err, redact, said", [
    (ValueError("no body found\n(second line)"), False, "ValueError: no body found"),
    (KeyError("state_dict"), False, "KeyError: 'state_dict'"),
    (RuntimeError(), False, "RuntimeError"),
    # a header value quoted by pydicom may be the patient's name; a long digit run a date or UID
    (ValueError("invalid literal for int() with base 10: 'DOE^JOHN'"), True,
     "ValueError: invalid literal for int() with base 10: '...'"),
    (ValueError("bad value 19450317 in 1.2.840.113619.2.55.3"), True, "ValueError: bad value # in #"),
])
def test_an_unforeseen_error_is_named_by_its_reason_not_only_its_type(err, redact, said):  # item 9
    from bonescan_model.errors import describe
    assert describe(err, redact=redact) == said
