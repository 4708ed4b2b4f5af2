"""Experiment tracking in MLflow: ``--mlflow URI`` (or ``MLFLOW_TRACKING_URI``) on train and tune.

One MLflow run per training run: the resolved config as params, every epoch's metrics (logged
by rank 0 inside the training function: Ray Train V2 takes no logger callbacks), the kept
model's test-split scores once at the end (``test_*``: the split is in the name, as everywhere),
and the model as artifacts (``model/model.pt`` carries its config and threshold: it alone
rebuilds the model; beside it config.yaml, history.csv, test.json). A sweep is a parent run
with one child run per trial; the trial kept by the space's validation metric is registered as
``bonescan-<name>``, as is the model of a plain `bonescan train`.

MLflow is an optional extra (``pip install 'bonescan[mlflow]'``). Everything goes through
``MlflowClient`` with explicit run ids, never mlflow's global active run: the driver, each
trial's Tune function and rank 0 of its Train workers are separate processes logging to one
run. The run id is kept in the run folder's run.json (the experiment's experiment.json), so
``--resume`` goes on logging into the same MLflow run.

No patient identifier reaches MLflow: params are the training config, metrics are numbers,
artifacts are the run's model and tables (splits.json, which lists keyed patient hashes, stays
in the run folder).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bonescan_model.errors import InputError

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable: the MLflow experiment runs go to
DEFAULT_EXPERIMENT = "bonescan"
INSTALL = "pip install 'bonescan[mlflow]'"
PARAMS_PER_CALL = 100  # MLflow's log_batch limit on params


def tracking_uri(flag: str | None) -> str | None:
    """The tracking URI of a command: ``--mlflow`` first, then MLFLOW_TRACKING_URI; None: no tracking."""
    return flag or os.environ.get(ENV_URI) or None


def client(uri: str):
    """An MlflowClient on ``uri``; without the extra, a one-line error saying how to install it."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise InputError("--mlflow", f"MLflow is not installed: {INSTALL}") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def model_name(name: str) -> str:
    """``bonescan-<name>``, in the characters a registered model name may hold."""
    return "bonescan-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run")


@dataclass(frozen=True)
class Tracker:
    """One MLflow run: where it lives and its id (the plain form travels in run.json and to workers)."""

    uri: str
    run_id: str

    def to_dict(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id}

    @classmethod
    def from_dict(cls, record: dict | None) -> Tracker | None:
        return cls(record["uri"], record["run_id"]) if record else None

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        """The finite numbers of ``metrics`` (booleans and text left out) at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if batch:
            client(self.uri).log_batch(self.run_id, metrics=batch)

    def log_epoch(self, metrics: dict) -> None:
        """One epoch's row of history.csv, at step ``epoch``."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))

    def finish(self, artifacts: list[Path], tested: dict, summary: dict) -> None:
        """The end of a training run: the test split's scores (``test_*``), the validation
        summary, the model and tables (``artifacts``: ``runs.Run.artifacts``); the MLflow run
        marked finished."""
        self.log_metrics({k: v for k, v in tested.items() if not isinstance(v, (dict, list))}, prefix="test_")
        self.log_metrics(summary)
        mlflow = client(self.uri)
        for path in artifacts:
            mlflow.log_artifact(self.run_id, str(path), artifact_path="model")
        mlflow.set_terminated(self.run_id, "FINISHED")

    def finished(self) -> bool:
        return client(self.uri).get_run(self.run_id).info.status == "FINISHED"

    def register(self, name: str) -> str:
        """This run's model/ artifacts as a new version of the registered model ``name``; its version."""
        from mlflow.exceptions import MlflowException

        mlflow = client(self.uri)
        try:
            mlflow.create_registered_model(name)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{mlflow.get_run(self.run_id).info.artifact_uri}/model"
        return mlflow.create_model_version(name, source, run_id=self.run_id).version


def start(uri: str, run_name: str, params: dict, tags: dict | None = None,
          parent: Tracker | None = None) -> Tracker:
    """A new MLflow run in MLFLOW_EXPERIMENT_NAME (default ``bonescan``), its params logged;
    a child of ``parent`` when given (MLflow's parentRunId tag: the UI nests it)."""
    from mlflow.entities import Param

    mlflow = client(uri)
    experiment = os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)
    all_tags = {"bonescan.folder": run_name, **(tags or {})}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    created = mlflow.create_run(experiment_id, run_name=run_name, tags=all_tags)
    flat = [Param(k, str(v)) for k, v in sorted(flatten(params).items())]
    for i in range(0, len(flat), PARAMS_PER_CALL):
        mlflow.log_batch(created.info.run_id, params=flat[i:i + PARAMS_PER_CALL])
    return Tracker(uri, created.info.run_id)


def flatten(mapping: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"model.width": 16, ...}`` (lists kept as their text)."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
