"""`bonescan train` / `evaluate` on a real local Ray: reports, checkpoints, resumes, repeats."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bonescan_model import batching
from bonescan_platform import harness, shards, train
from bonescan_platform.cli import main
from tiny import tiny_config

TINY = tiny_config()


@pytest.fixture(scope="module")
def data(cohort):
    return cohort(8, 11)


def _config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def _checkpoints(run: Path) -> list[Path]:
    """Ray Train's checkpoint folders of a run (not its checkpoint_manager_snapshot.json, which
    the same pattern matches and which appears with the first checkpoint)."""
    return [p for p in (run / "train").glob("checkpoint_*") if p.is_dir()]


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory, mlflow_server) -> Path:
    """One `bonescan train --mlflow` of 2 epochs, seed 3; several tests read it (a train is
    ~40 s of the suite)."""
    folder = tmp_path_factory.mktemp("first")
    run = folder / "a"
    assert main(["train", "--data", str(data), "--config", str(_config(folder, epochs=2, seed=3)),
                 "--out", str(run), "--mlflow", mlflow_server]) == 0
    return run


def test_train_reports_every_epoch_and_keeps_the_best(data, first_run, tmp_path, mlflow_server):
    run = first_run
    history = _history(run)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for row in history:
        assert float(row["train_loss"]) > 0 and 0 <= float(row["val_dsc"]) <= 1
        assert int(row["train_images"]) > 0 and int(row["val_images"]) > 0
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    parts = json.loads((run / "splits.json").read_text())
    assert set(parts) == {"train", "val", "test"} and parts["val"] and parts["test"]
    assert sum(len(v) for v in parts.values()) == len(set().union(*map(set, parts.values())))  # disjoint
    budget = json.loads((run / "budget.json").read_text())
    assert budget["val_patients"] == len(parts["val"]) and budget["labeled_scans"] <= budget["train_scans"]
    tested = json.loads((run / "test.json").read_text())  # the kept model, scored once at the end
    assert tested["split"] == "test" and tested["epoch"] in (1, 2) and tested["images"] > 0
    _check_mlflow(mlflow_server, run, history, tested, parts)

    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--runs", "3",
                 "--json", str(report)]) == 0
    body = json.loads(report.read_text())
    assert {"dsc", "cpa", "recall", "runs"} <= set(body) and len(body["runs"]) == 3
    assert all(0 <= r["dsc"] <= 1 for r in body["runs"])


def _check_mlflow(uri: str, run: Path, history: list[dict], tested: dict, parts: dict) -> None:
    """What `--mlflow` left in the server, read back through MlflowClient: the resolved config,
    each epoch's metrics (logged by rank 0 in the worker), the test scores, the model, the
    registered version; no patient key anywhere."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = json.loads((run / "run.json").read_text())["mlflow"]["run_id"]
    got = client.get_run(run_id)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert got.data.params["lr"] == str(config["lr"]) and got.data.params["model.width"] == "4"
    assert got.data.params["epochs"] == "2" and got.info.status == "FINISHED"
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "val_dsc")]
    assert logged == [(int(r["epoch"]), pytest.approx(float(r["val_dsc"]))) for r in history]
    assert got.data.metrics["test_dsc"] == pytest.approx(tested["dsc"], nan_ok=True)
    assert got.data.metrics["test_lesion_sensitivity"] == pytest.approx(tested["lesion_sensitivity"])
    saved = client.download_artifacts(run_id, "model/model.pt", str(run.parent))
    assert Path(saved).read_bytes() == (run / "model.pt").read_bytes()
    (version,) = client.search_model_versions(f"name='bonescan-{run.name}'")
    assert version.run_id == run_id
    keys = {k for split in parts.values() for k in split}
    shown = json.dumps([got.data.params, got.data.tags, got.data.metrics])
    assert not any(k in shown for k in keys)


def _other_test_split(data: Path, out: Path) -> Path:
    """A copy of the shards whose test scans are other images with other masks."""
    shutil.copytree(data, out)
    manifest = shards.read_manifest(out)
    infos = []
    for entry in manifest["shards"]:
        path = out / entry["file"]
        rows = pq.read_table(path).to_pylist()
        if entry["split"] == "test":
            rng = np.random.default_rng(0)
            rows = [{**r, "ant": shards.encode_image(rng.integers(0, 400, (256, 256)), "<u2"),
                     "mask": shards.encode_image(rng.random((256, 256)) < 0.01, "u1")} for r in rows]
        infos.append(shards.write_shard(rows, path))
    shards.write_manifest(out, infos, manifest["report"])
    return out


def test_arms_given_the_same_step_budget_take_the_same_optimizer_steps(data, first_run, tmp_path):
    # first_run: 2 epochs of view pairs. The same budget in steps, for an arm whose samples are the
    # single views (twice the samples per scan, half the scans per batch): as many optimizer steps.
    budget = json.loads((first_run / "budget.json").read_text())
    steps = int(_history(first_run)[-1]["steps"])
    assert steps == budget["planned_steps"] == 2 * budget["planned_steps_per_epoch"]
    run = tmp_path / "views"
    config = _config(tmp_path, max_steps=steps, model={**TINY["model"], "aggregation": "views"}, seed=3)
    assert main(["train", "--data", str(data), "--config", str(config), "--out", str(run)]) == 0
    history, views_budget = _history(run), json.loads((run / "budget.json").read_text())
    assert int(history[-1]["steps"]) == steps
    assert views_budget["training_samples"] == 2 * views_budget["training_rows"] == 2 * budget["training_samples"]
    assert views_budget["labeled_samples"] == 2 * budget["labeled_samples"] > 0
    # Half the scans per step: more steps to an epoch, so the budget ends in the epoch it planned.
    assert views_budget["planned_steps_per_epoch"] > budget["planned_steps_per_epoch"]
    assert len(history) == views_budget["planned_epochs"]
    assert int(history[-1]["samples"]) == sum(int(r["train_images"]) for r in history) <= steps * TINY["batch_size"]


def test_same_seed_same_metrics_and_the_test_split_chooses_nothing(data, first_run, tmp_path):
    # Two epochs: the second one's stream is started early, on a thread (batching.started_early).
    # Run b trains with run a's config (seed 3) on the same shards but for the test split, and
    # without MLflow: it must keep the same checkpoint.
    assert train.train(str(_other_test_split(data, tmp_path / "other")), str(first_run / "config.yaml"),
                       str(tmp_path / "b")) == 0
    runs = (first_run, tmp_path / "b")
    keys = ("train_loss", "train_supervised", "val_dsc", "val_cpa", "val_recall")
    first, second = (_history(run) for run in runs)
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    kept = [torch.load(run / "model.pt", weights_only=True) for run in runs]
    assert kept[0]["meta"]["epoch"] == kept[1]["meta"]["epoch"]
    assert all(torch.equal(kept[0]["state_dict"][k], kept[1]["state_dict"][k]) for k in kept[0]["state_dict"])
    tested = [json.loads((run / "test.json").read_text()) for run in runs]
    assert tested[0]["runs"][0]["lesions"] != tested[1]["runs"][0]["lesions"]  # the test split did change


def test_bad_config_names_the_key(data, tmp_path):
    bad = _config(tmp_path, epochz=3)
    assert main(["train", "--data", str(data), "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    bad.write_text(yaml.safe_dump({**TINY, "epochs": "many"}))
    with pytest.raises(Exception, match="epochs"):
        train.train(str(data), str(bad), str(tmp_path / "r"))


def test_a_killed_worker_and_then_a_killed_driver_both_resume_from_checkpoints(data, tmp_path, ray_local):
    """One run (a train is ~25 s of the suite) through both failures: its worker killed, which
    Ray Train replaces from the latest checkpoint; then its driver killed, and `--resume`."""
    import os
    import signal
    import subprocess
    import sys

    from ray._private.worker import global_worker
    from ray.util.state import list_actors

    from bonescan_model.checkpoint import read_file

    run = tmp_path / "run"
    # With a mean teacher (issue 12): the teacher is in every checkpoint and comes back with it.
    # Two-stream batches, 2 labeled + 2 unlabeled scans a step (the teacher trains on both
    # streams): the supervised term sees exactly 2 labeled scans a step, whatever the label
    # share, across both failures too.
    config = _config(tmp_path, epochs=6, semi="mean_teacher", rampup_epochs=1, labeled_batch_size=2,
                     unlabeled_batch_size=2, label_fraction=0.3)
    # The driver joins the session's Ray through RAY_ADDRESS, as `bonescan train` does.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "bonescan_platform.cli", "train", "--data", str(data),
                               "--config", str(config), "--out", str(run)], stdout=log, stderr=subprocess.STDOUT, env=env)
    dashboard = "http://" + global_worker.node.address_info["webui_url"]

    def workers() -> list:  # the driver's Train worker: its job's, not this session's own
        own = ray_local.get_runtime_context().get_job_id()
        return [a for a in list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                                    ("state", "=", "ALIVE")]) if a.job_id != own]

    def wait_for(done, what: str) -> None:
        deadline = time.time() + 300
        while not done() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert done(), f"{what}: {(tmp_path / 'driver.log').read_text()[-3000:]}"

    try:
        # A second checkpoint folder means the first one was committed (a folder appears while
        # its upload is still in flight): kill the worker during epoch 3.
        wait_for(lambda: len(_checkpoints(run)) >= 2, "no checkpoint was written")
        (worker,) = workers()
        killed_at = max(p.name for p in _checkpoints(run))
        os.kill(worker.pid, signal.SIGKILL)
        # Its replacement has committed a checkpoint of its own (two folders of its): stop the driver.
        wait_for(lambda: sum(p.name > killed_at for p in _checkpoints(run)) >= 2, "the replaced worker wrote no checkpoint")
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    assert not (run / "history.csv").exists(), "the driver finished before it could be stopped"
    assert main(["train", "--resume", str(run)]) == 0
    history = _history(run)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4, 5, 6]
    resumed = [int(r["epoch"]) for r in history if r.get("resumed") == "True"]
    assert len(resumed) == 2, f"resumed from the epochs {resumed}: one by Ray Train, one by --resume"
    last = max(_checkpoints(run))
    teacher = read_file(last / harness.STATE)["teacher"]
    assert teacher["decay"] == 0.99 and teacher["model"].keys() == read_file(last / "model.pt")["state_dict"].keys()

    budget = json.loads((run / "budget.json").read_text())
    assert budget["batching"] == "two_stream" and budget["labeled_batch_size"] == 2
    steps = int(history[-1]["steps"])
    assert steps == budget["planned_steps"] == 6 * budget["planned_steps_per_epoch"]
    assert budget["planned_steps_per_epoch"] == -(-budget["training_rows"] // 4)
    assert int(history[-1]["labeled_seen"]) == 2 * steps == budget["planned_labeled_seen"]
    assert sum(int(r["train_labeled_images"]) for r in history) == 2 * steps
    assert sum(int(r["train_images"]) for r in history) == 4 * steps  # 2 unlabeled a step too
    assert budget["labeled_rows"] < budget["training_rows"] / 2  # fewer labeled than unlabeled scans
    # Each epoch validates student and teacher and keeps the better (named in history and test.json).
    assert all({"val_student_dsc", "val_teacher_dsc"} <= set(r) and r["kept_weights"] in ("student", "teacher")
               for r in history)
    assert json.loads((run / "test.json").read_text())["kept_weights"] in ("student", "teacher")


def test_each_epoch_is_one_seeded_shuffle_that_mixes_patients(ray_local):
    """Rows come in patient order, four copies each (as augmented copies follow their original in
    the shards): every batch mixes patients, an epoch's order repeats for its seed, epochs differ."""
    import ray

    from bonescan_model.train_config import TrainConfig

    rows = [{"image": np.zeros((2, 4, 4), np.float32), "mask": np.zeros((1, 4, 4), np.float32),
             "labeled": p % 2 == 0, "patient": p} for p in range(10) for _ in range(4)]
    ds = ray.data.from_items(rows)
    ds.context.execution_options.preserve_order = True  # as the run's DataConfig sets it (harness.split_train)
    shard = ds.iterator()
    cfg = TrainConfig.from_dict({"batch_size": 4, "augment": False, "seed": 5, "epochs": 2})

    def epoch(n: int) -> list[list[int]]:
        return [b["patient"].tolist() for b in batching.epoch_batches(shard, cfg, n, rank=0, shuffle_rows=40)]

    first = epoch(0)
    assert sorted(sum(first, [])) == sorted(r["patient"] for r in rows)
    assert all(len(set(batch)) > 1 for batch in first)
    assert epoch(0) == first and epoch(1) != first
