"""Shards and runs in object storage, end to end: ingest -> train -> driver killed ->
`--resume` -> evaluate -> predict -> report, every location an ``s3://`` URI.

A real S3 endpoint on loopback (moto's server mode), the real pyarrow S3 client, and a real
Ray cluster of the test's own whose node holds the credentials in its environment, as a
cluster's nodes do (the session's shared Ray was started without them). The commands run as
separate drivers joining that cluster, so one can be killed as a user's would be."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bonescan_model.synth import write_cohort
from bonescan_platform.cli import main
from tiny import tiny_config

BUCKET = "bonescan-test"
HEAD = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 200 * 1024**2})
    print("READY", cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()
""")


@pytest.fixture(scope="module")
def s3(s3_server, deid_secret):
    s3_server.filesystem().create_dir(BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def head(s3):
    """A Ray head of this module's own, in its own process, its environment holding the
    endpoint and credentials; closing its stdin shuts down exactly this cluster."""
    process = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled"})
    line = process.stdout.readline().split()
    assert line[:1] == ["READY"], f"the Ray head did not start: {line!r}"
    yield line[1]
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _command(env: dict, *args: str) -> list[str]:
    return [sys.executable, "-m", "bonescan_platform.cli", *args]


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(env, *args), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bonescan {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def _files(fs: pafs.FileSystem, prefix: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File}


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def ingested(head, s3, tmp_path_factory):
    """A synthetic cohort on local disk (as a PACS export is), ingested into the bucket."""
    root = tmp_path_factory.mktemp("object-storage")
    write_cohort(root / "cohort", 8, seed=11)
    env = {**os.environ, **s3.env, "RAY_ADDRESS": head}
    shards_uri = f"s3://{BUCKET}/shards"
    _run(env, "ingest", "--dicom", str(root / "cohort" / "dicom"), "--labels", str(root / "cohort" / "labels"),
         "--out", shards_uri)
    return {"root": root, "env": env, "shards": shards_uri}


@pytest.mark.ray
def test_ingest_train_resume_evaluate_predict_report_all_in_object_storage(s3, ingested, tmp_path, monkeypatch):
    fs = s3.filesystem()
    env, shards_uri, run_uri = ingested["env"], ingested["shards"], f"s3://{BUCKET}/runs/a"

    # ingest wrote shards and manifest straight into the bucket, nothing locally
    written = _files(fs, f"{BUCKET}/shards")
    manifest = json.loads(_read(fs, f"{BUCKET}/shards/_manifest.json"))
    assert {s["file"] for s in manifest["shards"]} == {n for n in written if n.endswith(".parquet")}
    assert "_ingest_report.json" in written and sorted(p.name for p in ingested["root"].iterdir()) == ["cohort"]
    # and the folder is one Parquet dataset to pyarrow, read from the bucket as it is
    with monkeypatch.context() as m:
        for key, value in s3.env.items():
            m.setenv(key, value)
        assert pq.read_table(shards_uri, columns=["scan_key"]).num_rows == manifest["rows"] > 0

    # geometric copies (D2) from the bucket into the bucket
    _run(env, "augment", "--data", shards_uri, "--out", f"s3://{BUCKET}/shards-d2", "--copies", "1")
    augmented = json.loads(_read(fs, f"{BUCKET}/shards-d2/_manifest.json"))
    assert augmented["rows"] == 2 * manifest["rows"]
    assert {s["file"] for s in augmented["shards"]} == {n for n in _files(fs, f"{BUCKET}/shards-d2")
                                                        if n.endswith(".parquet")}

    # train, its driver killed once Ray Train has two checkpoints in the bucket; then --resume
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(epochs=3)))
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(_command(env, "train", "--data", shards_uri, "--config", str(config), "--out", run_uri),
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            checkpoints = {f.split("/")[0] for f in _files(fs, f"{BUCKET}/runs/a/train") if "/" in f}
            if len({c for c in checkpoints if c.startswith("checkpoint_")}) >= 2:
                break
            time.sleep(0.2)
    finally:
        exited = driver.poll()
        driver.kill()
        driver.wait()
        log.close()
    assert exited is None, f"the driver exited ({exited}) first: {(tmp_path / 'driver.log').read_text()[-3000:]}"
    before = _files(fs, f"{BUCKET}/runs/a")
    assert {"run.json", "config.yaml", "splits.json", "budget.json"} <= before, before
    assert "history.csv" not in before, "the driver finished before it could be stopped"
    resumed = _run(env, "train", "--resume", run_uri)
    assert f"{run_uri}/model.pt" in resumed.stdout
    history = list(csv.DictReader(io.StringIO(_read(fs, f"{BUCKET}/runs/a/history.csv").decode())))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert any(r.get("resumed") == "True" for r in history)
    after = _files(fs, f"{BUCKET}/runs/a")
    assert {"model.pt", "test.json", "history.csv"} <= after
    tested = json.loads(_read(fs, f"{BUCKET}/runs/a/test.json"))
    assert json.loads(_read(fs, f"{BUCKET}/runs/a/run.json"))["data"] == shards_uri

    with monkeypatch.context() as m:  # the commands that need no Ray run in this process
        for key, value in s3.env.items():
            m.setenv(key, value)
        # evaluate: the run's kept model on the test split, read from the bucket; JSON back to it
        assert main(["evaluate", "--checkpoint", run_uri, "--data", shards_uri, "--runs", "1",
                     "--json", f"s3://{BUCKET}/eval.json"]) == 0
        scored = json.loads(_read(fs, f"{BUCKET}/eval.json"))
        assert scored["split"] == "test" and scored["checkpoint"] == run_uri
        assert scored["dsc"] == pytest.approx(tested["dsc"]) and scored["images"] == tested["images"]
        # export: the checkpoint from the bucket, the TorchScript file back to it
        assert main(["export", "--checkpoint", run_uri, "--format", "torchscript",
                     "--out", f"s3://{BUCKET}/exports/model.ts"]) == 0
        exported = torch.jit.load(io.BytesIO(_read(fs, f"{BUCKET}/exports/model.ts")))
        assert exported(torch.zeros(1, 2, 256, 256)).shape == (1, 1, 256, 256)
        # report of the run, written to the bucket, self-contained
        assert main(["report", "--experiment", run_uri, "--out", f"s3://{BUCKET}/report.html"]) == 0
        page = _read(fs, f"{BUCKET}/report.html").decode()
        assert run_uri in page and "<img" in page and "test split" in page

    # predict a folder of scans on the cluster: each actor fetches the checkpoint and sends its
    # outputs to the bucket
    dicom = ingested["root"] / "cohort" / "dicom"
    assert len([p for p in dicom.rglob("*") if p.is_file()]) > 1
    _run(env, "predict", "--checkpoint", f"{run_uri}/model.pt", "--dicom", str(dicom),
         "--out", f"s3://{BUCKET}/predictions")
    outputs = _files(fs, f"{BUCKET}/predictions")
    masks = {o for o in outputs if o.endswith(".mask.png")}
    assert len(masks) == len(manifest["report"]["scans"]) and masks
    for mask in masks:
        stem = mask.removesuffix(".mask.png")
        assert {f"{stem}.json", f"{stem}.overlay.png"} <= outputs


@pytest.mark.ray
def test_a_sweep_in_object_storage_runs_to_its_table_and_report(s3, ingested, tmp_path, monkeypatch):
    fs = s3.filesystem()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(epochs=1, supervised="dice_ce")))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": "tiny.yaml", "evaluate_runs": 1,
                                     "parameters": {"label_fraction": {"grid": [0.6]}}}))  # one trial: the suite's time
    exp_uri = f"s3://{BUCKET}/experiments/sweep"
    _run(ingested["env"], "tune", "--data", ingested["shards"], "--space", str(space), "--out", exp_uri)
    files = _files(fs, f"{BUCKET}/experiments/sweep")
    assert {"experiment.json", "space.yaml", "base.yaml", "results.parquet", "results.csv"} <= files
    assert any(f.startswith("tune/") for f in files), "Ray Tune kept its state elsewhere"
    rows = pq.read_table(f"{BUCKET}/experiments/sweep/results.parquet", filesystem=fs).to_pylist()
    assert [r["label_fraction"] for r in rows] == [0.6]
    for row in rows:
        assert row["status"] == "finished" and row["run"] == f"{exp_uri}/runs/{row['trial_id']}"
        assert {f"runs/{row['trial_id']}/{name}" for name in ("model.pt", "test.json", "history.csv")} <= files
        assert any(f.startswith(f"runs/{row['trial_id']}/train/checkpoint_") for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "tiny.yaml"]
    with monkeypatch.context() as m:
        for key, value in s3.env.items():
            m.setenv(key, value)
        assert main(["report", "--experiment", exp_uri, "--out", str(tmp_path / "sweep.html")]) == 0
    page = (tmp_path / "sweep.html").read_text()
    assert exp_uri in page and "L_label" in page


@pytest.mark.parametrize("args, reason", [
    (["ingest", "--dicom", "s3://bucket/dicom", "--out", "OUT"], "copy the export out of object storage first"),
    (["predict", "--checkpoint", "CKPT", "--dicom", "s3://bucket/dicom", "--out", "OUT"],
     "copy the scans out of object storage first"),
    (["train", "--data", "nosuchscheme://bucket/shards", "--config", "CONFIG", "--out", "OUT"],
     "not a storage location pyarrow can open"),
])
def test_what_object_storage_cannot_hold_is_refused_in_one_line(args, reason, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    args = [{"OUT": str(tmp_path / "out"), "CKPT": str(tmp_path / "model.pt"), "CONFIG": str(config)}.get(a, a)
            for a in args]
    (tmp_path / "model.pt").write_bytes(b"")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0], err
    assert not (tmp_path / "out").exists()
