"""MLflow tracking (issue 14, item 3): a run's params, epochs, test scores, artifacts and
registered model, written by ``tracking`` to a real `mlflow server` on 127.0.0.1 and read back
through MlflowClient. The train and tune commands' own logging is tested end to end in
test_train.py and test_tune.py (they need Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bonescan_platform import tracking


def test_flatten_and_model_name():
    assert tracking.flatten({"lr": 0.1, "model": {"width": 4, "dilations": [1, 2]}}) == \
        {"lr": 0.1, "model.width": 4, "model.dilations": [1, 2]}
    assert tracking.model_name("exp 12/b") == "bonescan-exp-12-b"
    assert tracking.model_name("///") == "bonescan-run"


def test_the_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env")
    assert tracking.tracking_uri("http://flag") == "http://flag"
    assert tracking.tracking_uri(None) == "http://from-env"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(None) is None


@pytest.mark.parametrize("command", ["train", "tune"])
def test_without_the_extra_mlflow_says_how_to_install_it(tmp_path, command):
    # mlflow made unimportable in a fresh interpreter: the command fails before reading anything.
    args = (["train", "--data", str(tmp_path / "none"), "--config", str(tmp_path / "none.yaml"), "--out",
             str(tmp_path / "run")] if command == "train" else
            ["tune", "--data", str(tmp_path / "none"), "--space", str(tmp_path / "none.yaml"), "--out",
             str(tmp_path / "exp")])
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "from bonescan_platform.cli import main\n"
            f"raise SystemExit(main({args + ['--mlflow', 'http://127.0.0.1:9']!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: --mlflow: MLflow is not installed: pip install 'bonescan[mlflow]'"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "exp").exists()


def test_a_run_round_trips_through_a_real_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from bonescan_platform.runs import Run

    run = Run(tmp_path / "run")
    run.root.mkdir()
    run.model_path.write_bytes(b"weights")
    run.write_history([{"epoch": 1, "val_dsc": 0.2}, {"epoch": 2, "val_dsc": 0.4}])
    tracker = tracking.start(mlflow_server, "run", {"lr": 0.002, "model": {"width": 4}}, tags={"bonescan.job": "x"})
    tracker.log_epoch({"epoch": 1, "val_dsc": 0.2, "resumed": True, "train_loss": float("nan")})
    tracker.log_epoch({"epoch": 2, "val_dsc": 0.4})
    tracker.finish(run.artifacts(), {"dsc": 0.3, "split": "test", "runs": [{"dsc": 0.3}]}, {"best_val_dsc": 0.4})
    version = tracker.register("bonescan-run")

    client = MlflowClient(mlflow_server)
    got = client.get_run(tracker.run_id)
    assert got.data.params == {"lr": "0.002", "model.width": "4"}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "val_dsc")] == [(1, 0.2), (2, 0.4)]
    assert "train_loss" not in got.data.metrics and "resumed" not in got.data.metrics  # NaN, bool: left out
    assert got.data.metrics["test_dsc"] == 0.3 and got.data.metrics["best_val_dsc"] == 0.4
    assert got.info.status == "FINISHED" and got.data.tags["bonescan.job"] == "x"
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "model")) == \
        ["model/history.csv", "model/model.pt"]
    local = client.download_artifacts(tracker.run_id, "model/model.pt", str(tmp_path))
    assert open(local, "rb").read() == b"weights"
    registered = client.get_model_version("bonescan-run", version)
    assert registered.run_id == tracker.run_id and registered.source.endswith("/model")
    assert json.loads(json.dumps(tracker.to_dict())) == {"uri": mlflow_server, "run_id": tracker.run_id}
    assert tracking.Tracker.from_dict(tracker.to_dict()) == tracker
