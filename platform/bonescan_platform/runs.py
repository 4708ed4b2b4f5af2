"""The run folder and the experiment folder: what is in them, and the one reader of each.

A run folder (`bonescan train --out RUN`, or one trial of a sweep):

    config.yaml   the resolved training config        run.json     data, workers, GPUs, MLflow run
    splits.json   the patients of each split          budget.json  label budget, samples, planned steps
    train/        Ray Train's storage (checkpoints)   model.pt     the kept model (best val DSC)
    history.json  one row per epoch (and history.csv)  test.json   the kept model, scored once on test
    trial.json    (a trial's) id, parameters, label

An experiment folder (`bonescan tune --out EXP`):

    experiment.json   data path, space path, resources plan     space.yaml, base.yaml  the space, its base
    tune/             Ray Tune's experiment (state for --resume)  runs/<trial id>/       one run per trial
    results.parquet, results.csv   one row per trial (``tune.collect``)

train, tune, evaluate and report read these folders here (``kept_model``: the model a run
kept, with its threshold and config). Ray's own objects where they
serve: a run's checkpoints come back as Ray Train's ``Result.from_path``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bonescan_model.checkpoint import FILENAME, Trained
from bonescan_model.checkpoint import load_model as load_checkpoint_model
from bonescan_model.errors import InputError
from bonescan_platform import storage, tracking
from bonescan_platform.config import TrainConfig, load_train_config, read_yaml, save_train_config
from bonescan_platform.search_space import SearchSpace, load_space, parse_space

RUN_NAME = "train"  # Ray Train's folder in a run: fixed, so a rerun with the same folder resumes
TUNE_NAME = "tune"  # Ray Tune's folder in an experiment: fixed, so `tune/` is where --resume finds it
CONFIG, RECORD, HISTORY, HISTORY_JSON, TRIAL = "config.yaml", "run.json", "history.csv", "history.json", "trial.json"
EXPERIMENT, SPACE, BASE = "experiment.json", "space.yaml", "base.yaml"


# ---------------------------------------------------------------- a run folder
def is_run(folder: Path) -> bool:
    return (folder / HISTORY).is_file() and (folder / CONFIG).is_file()


def is_experiment(folder: Path) -> bool:
    return (folder / EXPERIMENT).is_file()


def kept_model(run: Path) -> Trained:
    """The run's kept model with its threshold and config (``checkpoint.load_model``)."""
    return load_checkpoint_model(run / FILENAME)


def read_history(run: Path) -> list[dict]:
    """The run's rows, one per epoch, with their types: history.json as written; a folder of an
    earlier version has only history.csv, read back as numbers (True/False as bools, empty cells
    dropped). [] for a run that has none yet."""
    if (run / HISTORY_JSON).is_file():
        return json.loads((run / HISTORY_JSON).read_text())
    if not (run / HISTORY).is_file():
        return []
    with open(run / HISTORY) as f:
        return [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def write_history(run: Path, history: list[dict], first: tuple[str, ...] = ("epoch",)) -> None:
    """history.json (the rows with their types, what ``read_history`` reads) and history.csv
    (the same for spreadsheets and pandas: one row per epoch, columns ``first`` in that order,
    then the rest by name)."""
    (run / HISTORY_JSON).write_text(json.dumps(history, indent=1))
    keys = sorted({k for row in history for k in row}, key=lambda k: (*(k != f for f in first), k))
    with open(run / HISTORY, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _number(text: str):
    if text in ("True", "False"):
        return text == "True"
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def train_result(run: Path):
    """Ray Train's ``Result`` of the run's checkpoints (``Result.from_path`` on ``train/``), or
    None where no checkpoint was committed: a run that did not return from ``fit()`` (a
    trial ASHA stopped, a driver that died) still has them."""
    from ray.train import Result

    with _quiet("ray.train"):  # it explains, at INFO, how a snapshot would resume a training
        try:
            result = Result.from_path(str(run / RUN_NAME))
        except RuntimeError:  # no such folder, or no checkpoint snapshot in it
            return None
    return result if result.checkpoint is not None else None


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- an experiment folder
@dataclass(frozen=True)
class Plan:
    """How trials share the cluster: ``trials`` at once, each ``workers`` Train workers."""

    trials: int
    workers: int
    cpu_per_worker: float
    gpus: bool


@dataclass(frozen=True)
class Experiment:
    """An experiment folder. root: the folder as this process reads and writes it (a local
    stage of it when it lives in object storage: ``storage``); location: where it lives."""

    root: Path
    data: str
    space: SearchSpace
    record: dict
    location: str = ""

    @property
    def home(self) -> str:
        return self.location or str(self.root)

    def run_location(self, trial_id: str) -> str:
        return storage.join(self.home, "runs", trial_id)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def trial_runs(self) -> list[Path]:
        """The trials' run folders, by trial id."""
        return sorted(p for p in self.runs.glob("*") if (p / TRIAL).is_file()) if self.runs.is_dir() else []

    @property
    def tracker(self) -> tracking.Tracker | None:
        return tracking.Tracker.from_dict(self.record.get("mlflow"))

    @classmethod
    def create(cls, root: Path, data: str, space_path: Path, mlflow: str | None = None,
               location: str = "") -> Experiment:
        """mlflow: a tracking URI; the sweep becomes a parent MLflow run (its id kept here)."""
        space = load_space(space_path)
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        (root / SPACE).write_text(space_path.read_text())
        save_train_config(TrainConfig.from_dict(space.base), root / BASE)
        record = {"data": str(data), "space": str(space_path), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if mlflow:
            record["mlflow"] = tracking.start(mlflow, root.name, {"space": space_path.name, "metric": space.metric,
                                                                  "mode": space.mode, "base": space.base},
                                              tags={"bonescan.job": "tune"}).to_dict()
        (root / EXPERIMENT).write_text(json.dumps(record, indent=2))
        return cls(root=root, data=record["data"], space=space, record=record, location=location)

    @classmethod
    def open(cls, root: str | Path, location: str = "") -> Experiment:
        root = Path(root).resolve()
        try:
            record = json.loads((root / EXPERIMENT).read_text())
        except FileNotFoundError:
            raise InputError(root, "not an experiment folder (no experiment.json; see `bonescan tune`)") from None
        space = _space((root / SPACE).read_text(), (root / BASE).read_text(), str(root))
        return cls(root=root, data=record["data"], space=space, record=record, location=location)

    def plan(self) -> Plan:
        return Plan(**self.record["plan"])

    def save_plan(self, plan: Plan) -> Experiment:
        record = {**self.record, "plan": plan.__dict__}
        (self.root / EXPERIMENT).write_text(json.dumps(record, indent=2))
        return Experiment(self.root, self.data, self.space, record, self.location)


@functools.lru_cache(maxsize=8)
def _space(space_text: str, base_text: str, root: str) -> SearchSpace:
    """An experiment's space, parsed (every grid combination validated) once per process for
    the same files: a sweep's driver and each trial open the experiment several times."""
    root = Path(root)
    return parse_space(read_yaml(root / SPACE, "space"), root / SPACE, load_train_config(root / BASE))
