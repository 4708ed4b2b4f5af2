"""The run folder and the experiment folder: the one owner of what is in them.

A run folder (`bonescan train --out RUN`, one trial of a sweep, an nnU-Net baseline):

    config.yaml   the resolved training config        run.json     data, workers, GPUs, MLflow run
    splits.json   the patients of each split          budget.json  label budget, samples, planned steps
    train/        Ray Train's storage (checkpoints)   model.pt     the kept model (best val DSC)
    history.json  one row per epoch, with its types   history.csv  the same rows, for spreadsheets
    test.json     the kept model, scored once on test trial.json   (a trial's) id, parameters, label

A DCGAN run folder (`bonescan augment --dcgan`): gan.yaml, run.json, train/, gan.pt, history.

An experiment folder (`bonescan tune --out EXP`):

    experiment.json   data path, space path, resources plan     space.yaml, base.yaml  the space, its base
    tune/             Ray Tune's experiment (state for --resume)  runs/<trial id>/       one run per trial
    results.parquet, results.csv   one row per trial (``tune.collect``)

``Run``, ``GanRun`` and ``Experiment`` are the only code that reads or writes these files (a
test enforces it): jobs hand the objects along and ask them, never the files. Ray's own
objects where they serve: a run's checkpoints come back as Ray Train's ``Result.from_path``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bonescan_model.checkpoint import FILENAME, Trained
from bonescan_model.checkpoint import load_model as load_checkpoint_model
from bonescan_model.errors import InputError
from bonescan_model.train_config import NnunetConfig, TrainConfig, load_train_config, read_yaml, save_train_config
from bonescan_platform import storage, tracking
from bonescan_platform.harness import RUN_NAME  # Ray Train's folder in a run (train/)
from bonescan_platform.search_space import SearchSpace, load_space, parse_space
from bonescan_platform.splits import Selection, Splits

TUNE_NAME = "tune"  # Ray Tune's folder in an experiment: fixed, so `tune/` is where --resume finds it
CONFIG, RECORD, HISTORY_CSV, HISTORY_JSON, TRIAL = "config.yaml", "run.json", "history.csv", "history.json", "trial.json"
SPLITS, BUDGET, TEST = "splits.json", "budget.json", "test.json"
EXPERIMENT, SPACE, BASE = "experiment.json", "space.yaml", "base.yaml"
GAN_CONFIG = "gan.yaml"
# What an MLflow run keeps of a finished run, as artifacts.
ARTIFACTS = (FILENAME, CONFIG, HISTORY_CSV, TEST, BUDGET)


# ---------------------------------------------------------------- a run folder
@dataclass(frozen=True)
class RunRecord:
    """run.json: what a run was started with beyond its config. data: the shards (a path or a
    URI, as first given); mlflow: its MLflow run (``tracking.Tracker.to_dict``)."""

    data: str
    workers: int = 1
    gpus: bool = False
    trainer: str = "bonescan"
    mlflow: dict | None = None

    @property
    def tracker(self) -> tracking.Tracker | None:
        return tracking.Tracker.from_dict(self.mlflow)


@dataclass(frozen=True)
class Trial:
    """trial.json: a sweep's trial: its Tune id, the sampled parameters and their label."""

    trial_id: str
    params: dict = field(default_factory=dict)
    label: str = ""


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2))


class _Folder:
    """A folder with a history: rows of one epoch (or checkpoint) each, kept twice: history.json
    with their types (what ``history`` reads) and history.csv for spreadsheets and pandas.
    root: the folder as this process reads and writes it (a local stage of it when it lives in
    object storage: ``storage``); location: where it lives ("" when that is root)."""

    HISTORY_FIRST: tuple[str, ...] = ("epoch",)

    def __init__(self, root: str | Path, location: str = ""):
        self.root = Path(root)
        self.location = location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.home!r})"

    @property
    def home(self) -> str:
        return self.location or str(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def record(self) -> RunRecord | None:
        """run.json, None where the folder has none (a folder made by hand: `bonescan report`)."""
        path = self.root / RECORD
        return RunRecord(**json.loads(path.read_text())) if path.is_file() else None

    @property
    def history(self) -> list[dict]:
        """The rows, one per epoch, with their types; [] for a folder that has none yet."""
        path = self.root / HISTORY_JSON
        return json.loads(path.read_text()) if path.is_file() else []

    @property
    def has_history(self) -> bool:
        return (self.root / HISTORY_JSON).is_file()

    def write_history(self, history: list[dict]) -> None:
        """history.json, then history.csv: columns HISTORY_FIRST in that order, the rest by name."""
        _write_json(self.root / HISTORY_JSON, history)
        first = self.HISTORY_FIRST
        keys = sorted({k for row in history for k in row}, key=lambda k: (*(k != f for f in first), k))
        with open(self.root / HISTORY_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    def where(self, name: str) -> str:
        """Where one of the folder's files lives (a path, or a URI), for messages."""
        return storage.join(self.home, name)


class Run(_Folder):
    """A run folder: its typed config, record, splits, budget, history, trial and test score."""

    @staticmethod
    def is_run(folder: Path) -> bool:
        return (Path(folder) / HISTORY_JSON).is_file() and (Path(folder) / CONFIG).is_file()

    @staticmethod
    def started(location: str) -> bool:
        """Whether ``location`` (a path or a URI) holds a started run: it has run.json."""
        return storage.is_file(storage.join(location, RECORD))

    @classmethod
    def create(cls, root: Path, cfg: TrainConfig | NnunetConfig, record: RunRecord, location: str = "") -> Run:
        """Write the run's resolved config and record: what resuming it needs."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        save_train_config(cfg, root / CONFIG)
        _write_json(root / RECORD, dataclasses.asdict(record))
        return cls(root, location)

    @classmethod
    def open(cls, root: str | Path, location: str = "") -> Run:
        run = cls(root, location)
        if not (run.root / RECORD).is_file():
            raise InputError(location or root, f"not a run folder (no {RECORD})")
        return run

    # what it was started with
    @functools.cached_property
    def config(self) -> TrainConfig | NnunetConfig:
        """The resolved config: a TrainConfig, or an NnunetConfig for an nnU-Net baseline."""
        record = self.record
        return load_train_config(self.root / CONFIG, record.trainer if record else "bonescan")

    @property
    def tracker(self) -> tracking.Tracker | None:
        record = self.record
        return record.tracker if record else None

    # what it chose
    def save_selection(self, selection: Selection) -> None:
        """splits.json (keyed hashes only) and budget.json (the label budget, beside the totals)."""
        _write_json(self.root / SPLITS, selection.splits.to_json())
        _write_json(self.root / BUDGET, {**selection.budget, "labeled_patient_keys": list(selection.labeled)})

    @property
    def splits(self) -> Splits:
        data = json.loads((self.root / SPLITS).read_text())
        return Splits(**{k: tuple(v) for k, v in data.items()})

    @property
    def budget(self) -> dict:
        path = self.root / BUDGET
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def planned_epochs(self) -> int:
        """The epochs the run was planned to train: cfg.epochs, or those its max_steps take."""
        return self.budget.get("planned_epochs", self.config.epochs)

    # a sweep's trial
    @property
    def trial(self) -> Trial | None:
        path = self.root / TRIAL
        return Trial(**json.loads(path.read_text())) if path.is_file() else None

    def write_trial(self, trial: Trial) -> None:
        _write_json(self.root / TRIAL, dataclasses.asdict(trial))

    # what it kept, and its one test score
    @property
    def model_path(self) -> Path:
        return self.root / FILENAME

    def kept_model(self) -> Trained:
        """The run's kept model with its threshold and config (``checkpoint.load_model``)."""
        return load_checkpoint_model(self.model_path)

    @property
    def test_score(self) -> dict | None:
        """test.json where it scores the run's current model.pt (written after it), else None."""
        tested, model = self.root / TEST, self.model_path
        if tested.is_file() and model.is_file() and tested.stat().st_mtime >= model.stat().st_mtime:
            return json.loads(tested.read_text())
        return None

    @property
    def any_test_score(self) -> dict | None:
        """test.json as it is (a folder may hold a score and no model: an nnU-Net baseline)."""
        path = self.root / TEST
        return json.loads(path.read_text()) if path.is_file() else None

    def write_test_score(self, body: dict) -> None:
        _write_json(self.root / TEST, body)

    def artifacts(self) -> list[Path]:
        """The files an MLflow run keeps of this run (those present)."""
        return [self.root / name for name in ARTIFACTS if (self.root / name).is_file()]

    def train_result(self):
        """Ray Train's ``Result`` of the run's checkpoints (``Result.from_path`` on ``train/``),
        or None where no checkpoint was committed: a run that did not return from ``fit()`` (a
        trial ASHA stopped, a driver that died) still has them."""
        from ray.train import Result

        with _quiet("ray.train"):  # it explains, at INFO, how a snapshot would resume a training
            try:
                result = Result.from_path(str(self.root / RUN_NAME))
            except RuntimeError:  # no such folder, or no checkpoint snapshot in it
                return None
        return result if result.checkpoint is not None else None

    @staticmethod
    def own_file(relative: str) -> bool:
        """The run folder's files this code writes, not Ray Train's (``RUN_NAME/``, which Ray
        reads and writes at the storage location itself)."""
        return not relative.startswith(f"{RUN_NAME}/")


class GanRun(_Folder):
    """A DCGAN run folder: its GanConfig (gan.yaml, as a plain mapping: ``dcgan`` validates
    it), its record, history (one row per checkpoint) and the kept gan.pt."""

    HISTORY_FIRST = ("epoch", "frechet")

    @property
    def config(self) -> dict | None:
        import yaml

        path = self.root / GAN_CONFIG
        return yaml.safe_load(path.read_text()) if path.is_file() else None

    def start(self, config: dict, record: RunRecord) -> None:
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / RECORD, dataclasses.asdict(record))
        # Second: gan.yaml marks the folder as a GAN run of this config.
        (self.root / GAN_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


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

    def trial_runs(self) -> list[Run]:
        """The trials' run folders, by trial id (each with its location where the experiment
        lives in object storage)."""
        folders = sorted(p for p in self.runs.glob("*") if (p / TRIAL).is_file()) if self.runs.is_dir() else []
        return [self.trial_run(p.name) for p in folders]

    def trial_run(self, trial_id: str, root: Path | None = None) -> Run:
        """The run of trial ``trial_id``: under runs/ here, or at ``root`` (a trial's own stage)."""
        return Run(root or self.runs / trial_id, self.run_location(trial_id) if self.location else "")

    @staticmethod
    def is_experiment(folder: Path) -> bool:
        return (Path(folder) / EXPERIMENT).is_file()

    @staticmethod
    def started(location: str) -> bool:
        return storage.is_file(storage.join(location, EXPERIMENT))

    def write_comparisons(self, rows: list[dict]) -> None:
        """comparisons.parquet and comparisons.csv: each arm against its control
        (``comparisons.table``); none without rows."""
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet as pq

        if rows:
            table = pa.Table.from_pylist(rows)
            pq.write_table(table, self.root / "comparisons.parquet")
            pyarrow.csv.write_csv(table, self.root / "comparisons.csv")

    def comparisons(self) -> list[dict]:
        """What ``write_comparisons`` wrote; [] where the sweep has no control."""
        import pyarrow.parquet as pq

        path = self.root / "comparisons.parquet"
        return pq.read_table(path).to_pylist() if path.is_file() else []

    def results(self) -> list[dict] | None:
        """The results table's rows (``write_results``); None before the sweep wrote it."""
        import pyarrow.parquet as pq

        path = self.root / "results.parquet"
        return pq.read_table(path).to_pylist() if path.is_file() else None

    def write_results(self, table) -> None:
        """results.parquet and results.csv: one row per trial (a pyarrow Table)."""
        import pyarrow.csv
        import pyarrow.parquet as pq

        pq.write_table(table, self.root / "results.parquet")
        pyarrow.csv.write_csv(table, self.root / "results.csv")

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

    def resource_plan(self) -> Plan:
        return Plan(**self.record["plan"])

    def save_resource_plan(self, plan: Plan) -> Experiment:
        record = {**self.record, "plan": plan.__dict__}
        (self.root / EXPERIMENT).write_text(json.dumps(record, indent=2))
        return Experiment(self.root, self.data, self.space, record, self.location)


@functools.lru_cache(maxsize=8)
def _space(space_text: str, base_text: str, root: str) -> SearchSpace:
    """An experiment's space, parsed (every grid combination validated) once per process for
    the same files: a sweep's driver and each trial open the experiment several times."""
    root = Path(root)
    return parse_space(read_yaml(root / SPACE, "space"), root / SPACE, load_train_config(root / BASE))
