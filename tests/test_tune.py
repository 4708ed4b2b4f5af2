"""`bonescan tune` on a real local Ray: a sweep runs to its table, a killed sweep resumes."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bonescan_platform.cli import main
from bonescan_model.train_config import TrainConfig
from bonescan_platform.search_space import parse_space
from bonescan_platform.tune import plan_resources
from tiny import tiny_config

TINY = tiny_config(epochs=2, supervised="dice_ce")


@pytest.fixture(scope="module")
def data(cohort):
    return cohort(6, 5)


def _space(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny.yaml", "evaluate_runs": 2, **keys}))
    return path


def _history_epochs(run: Path) -> list[int]:
    with open(run / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


# One sweep serves the whole story (a sweep is ~70 s of the suite): its driver killed after the
# first trial, `--resume`, ASHA's stop, the table, MLflow, TensorBoard.
# Last of the sweeps here: a trial ASHA stops leaves its placement group to Ray Train's cleaner,
# which needs the State API; on a machine running several Ray instances it cannot tell which
# one to ask, and a group left behind would hold CPUs the next sweep waits for.
def test_killed_sweep_resumes_stops_the_weak_trial_and_writes_its_table(data, tmp_path, ray_local, mlflow_server):
    # One trial at a time, so ASHA's decision is fixed: the first trial sets the rung, the
    # second (no labeled scan, so no labeled image trained) falls below it after epoch 1.
    # When the first has finished, the second is training (or about to start) as the driver is
    # killed; the resumed sweep (ASHA's rung restored with it) trains it and leaves the first
    # alone. Tune stops a trial while its training goes on (a tiny epoch here takes a second):
    # four epochs leave the stop time to land before the run ends on its own.
    epochs = 4
    space = _space(tmp_path, fixed={"epochs": epochs},
                   parameters={"label_fraction": {"grid": [0.5, 0.0]}}, metric="train_labeled_images",
                   mode="max", scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                   max_concurrent_trials=1)
    exp = tmp_path / "exp"
    args = ["tune", "--data", str(data), "--space", str(space), "--out", str(exp)]
    # The driver joins this session's Ray (not another one running on the machine).
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "bonescan_platform.cli", *args, "--mlflow", mlflow_server],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(exp.glob("runs/*/history.csv")) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finished = [p.parent for p in exp.glob("runs/*/history.csv")]
    assert finished, "no trial finished before the driver was stopped"
    assert not (exp / "results.parquet").exists(), "the sweep finished before its driver could be stopped"
    before = {run: ((run / "history.csv").read_bytes(), (run / "model.pt").stat().st_mtime_ns) for run in finished}
    assert len(before) == 1, "both trials finished before the driver was stopped"

    assert main([*args, "--resume"]) == 0  # MLflow: the experiment's own record
    for run, (history, model_time) in before.items():  # the finished one was not trained again
        assert (run / "history.csv").read_bytes() == history
        assert (run / "model.pt").stat().st_mtime_ns == model_time

    rows = pq.read_table(exp / "results.parquet").to_pylist()
    with open(exp / "results.csv") as f:
        assert [r["trial_id"] for r in csv.DictReader(f)] == [r["trial_id"] for r in rows]
    by_fraction = {r["label_fraction"]: r for r in rows}
    assert set(by_fraction) == {0.5, 0.0}
    full, stopped = by_fraction[0.5], by_fraction[0.0]
    assert (full["status"], full["epochs"]) == ("finished", epochs)
    assert stopped["status"] == "stopped" and 1 <= stopped["epochs"] < epochs
    assert full["labeled_scans"] > 0 and stopped["labeled_scans"] == 0
    for row in rows:  # every trial trained each epoch once
        run = Path(row["run"])
        assert (run / "model.pt").is_file() and _history_epochs(run) == list(range(1, row["epochs"] + 1))
        assert row["parameters"] > 0 and row["test_seconds"] > 0 and row["test_images"] > 0
        if row["lesion_images"]:  # the headline is over lesion-bearing test scans only
            assert 0 <= row["dsc"] <= 1 and 0 <= row["cpa"] <= 1 and 0 <= row["recall"] <= 1
        else:
            assert math.isnan(row["dsc"])
        assert row["evaluate_runs"] == 2
        assert TrainConfig.from_dict(yaml.safe_load(row["config"])).label_fraction == row["label_fraction"]
    _check_mlflow(mlflow_server, exp, by_fraction)
    # Ray Tune's TensorBoard output, for `tensorboard --logdir EXP`.
    assert list((exp / "tune").glob("*/events.out.tfevents.*"))


def _check_mlflow(uri: str, exp: Path, by_fraction: dict) -> None:
    """The sweep in MLflow: a parent run, a finished child per trial (the one ASHA stopped
    too) with its epochs and test scores, the trial best on the space's metric registered."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = json.loads((exp / "experiment.json").read_text())["mlflow"]["run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    ids = {json.loads((Path(r["run"]) / "run.json").read_text())["mlflow"]["run_id"]: r for r in by_fraction.values()}
    assert {c.info.run_id for c in children} == set(ids)
    for child in children:
        row = ids[child.info.run_id]
        assert child.info.status == "FINISHED" and child.data.params["label_fraction"] == str(row["label_fraction"])
        logged = len(client.get_metric_history(child.info.run_id, "train_labeled_images"))
        # Rank 0 logs an epoch, then reports its checkpoint: a trial ASHA stops may have logged
        # one epoch more than the checkpoints its kept history is rebuilt from.
        assert logged == row["epochs"] if row["status"] == "finished" else row["epochs"] <= logged <= row["epochs"] + 1
        assert child.data.metrics["test_images"] == row["test_images"]
    (version,) = client.search_model_versions(f"name='bonescan-{exp.name}'")
    best = by_fraction[0.5]  # the metric is train_labeled_images (max): the trial with labels
    assert ids[version.run_id] is best
    assert client.get_run(parent).data.tags["bonescan.best_trial"] == best["trial_id"]


def test_resume_and_rerun_are_refused_where_they_make_no_sense(data, tmp_path, capsys):
    space = _space(tmp_path, parameters={"label_fraction": {"grid": [0.2]}})
    exp = tmp_path / "exp"
    assert main(["tune", "--data", str(data), "--space", str(space), "--out", str(exp), "--resume"]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    assert main(["tune", "--data", str(tmp_path), "--space", str(space), "--out", str(exp)]) == 2
    assert "_manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("cluster, keys, expected", [
    ({"CPU": 2}, {}, (1, 0.75, False)),
    ({"CPU": 2}, {"max_concurrent_trials": 2}, (2, 0.25, False)),
    ({"CPU": 4}, {"max_concurrent_trials": 4}, (4, 0.5, False)),
    ({"CPU": 16}, {}, (12, 1.0, False)),
    ({"CPU": 16, "GPU": 4}, {}, (4, 1.0, True)),
    ({"CPU": 16, "GPU": 4}, {"resources": {"workers": 2}}, (2, 1.0, True)),
    ({"CPU": 16, "GPU": 4}, {"resources": {"gpus": False}, "max_concurrent_trials": 3}, (3, 4.75, False)),
])
def test_trials_share_the_cluster_and_leave_a_cpu_to_ray_data(cluster, keys, expected):
    space = parse_space({"parameters": {"seed": {"grid": [0, 1]}}, **keys}, "space.yaml", TrainConfig())
    plan = plan_resources(space, cluster)
    assert (plan.trials, plan.cpu_per_worker, plan.gpus) == expected
    assert plan.trials * (0.25 + plan.workers * plan.cpu_per_worker) <= cluster["CPU"] - 1


@pytest.mark.parametrize("cluster, keys, key", [
    ({"CPU": 2}, {"max_concurrent_trials": 4}, "max_concurrent_trials"),
    ({"CPU": 2}, {"resources": {"gpus": True}}, "resources.gpus"),
])
def test_a_plan_the_cluster_cannot_hold_names_its_key(cluster, keys, key):
    from bonescan_model.errors import InputError

    space = parse_space({"parameters": {"seed": {"grid": [0, 1]}}, **keys}, "space.yaml", TrainConfig())
    with pytest.raises(InputError, match=key):
        plan_resources(space, cluster)
