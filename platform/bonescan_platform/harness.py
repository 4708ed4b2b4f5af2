"""One Ray Train harness for every trainer: resources, restore, report, keep-best, once.

A trainer is a plain-PyTorch task (the segmentation engine's epoch: ``train``; the DCGAN's:
``dcgan``) run in Ray Train's ``train_loop_per_worker``. What every such task needs from Ray
is here and nowhere else:

- ``worker_cpus`` / ``worker_resources`` / ``split_train``: how its workers share a cluster
  with Ray Data (a CPU left to the reader: docs/ray.md, "2-CPU deadlock");
- ``trainer``: the TorchTrainer with the platform's failure policy (worker failures replaced
  3 times, placement a bounded wait) and checkpoints ranked by the task's metric;
- ``restore`` / ``report``: a checkpoint is the task's own files plus STATE (epoch, history,
  and whatever else the task resumes: optimizers, a mean teacher), written by rank 0;
- ``fit``: ``trainer.fit()`` with a placement failure said in one line;
- ``keep_best``: the best checkpoint's model file and the last one's history, into the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bonescan_model.checkpoint import read_file, write_file
from bonescan_model.errors import InputError
from bonescan_platform import cluster

STATE = "train_state.pt"  # beside the task's model file in every checkpoint
RUN_NAME = "train"  # Ray Train's folder in a run: fixed, so a rerun with the same folder resumes


# ---------------------------------------------------------------- resources
def worker_resources(cpu_per_worker: float, gpus: bool) -> dict[str, float]:
    """What one Train worker reserves: its CPUs, and a GPU with ``gpus`` (ScalingConfig's use_gpu)."""
    return {"CPU": cpu_per_worker, **({"GPU": 1.0} if gpus else {})}


def worker_cpus(cpus: float, workers: int, gpus: bool) -> tuple[float, int]:
    """(CPUs each worker reserves, torch threads it runs) for a run whose workers share the
    cluster's ``cpus``. A CPU is left to Ray Data: training workers holding every CPU starve
    the reader (docs/ray.md, "2-CPU deadlock")."""
    cpu_per_worker = 1.0 if gpus else max(0.25, min(1.0, (cpus - 1) / workers))
    return cpu_per_worker, max(1, int(os.cpu_count() // max(1, min(workers, cpus))))


def split_train(data_cpus: float, workers: int = 2):
    """The DataConfig of a trainer: "train" split across the workers, in order, Ray Data held
    to the ``data_cpus`` the workers leave (one at least). One worker reads it whole: a split
    into one part takes the same rows in the same order, through a coordinator actor whose start
    costs every single-worker run ~1.5 s (docs/ray.md)."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train"] if workers > 1 else [], execution_options=ExecutionOptions(
        preserve_order=True, resource_limits=ExecutionResources(cpu=max(1.0, data_cpus))))


# ---------------------------------------------------------------- the driver's side
def trainer(loop: Callable[[dict], None], loop_config: dict, *, storage_path: str, workers: int, gpus: bool,
            cpu_per_worker: float, datasets: dict, metric: str, mode: str, keep: int = 2, callbacks=(),
            torch_config=None):
    """The TorchTrainer of one run: ``loop`` on ``workers`` workers of ``cpu_per_worker`` CPUs
    (and a GPU each with ``gpus``), Ray Train's folder RUN_NAME under ``storage_path``, the
    ``keep`` best checkpoints by ``metric`` (``mode`` "max" or "min") kept."""
    import ray
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    DataContext.get_current().enable_progress_bars = False
    cpus = ray.cluster_resources().get("CPU", 1)
    return TorchTrainer(
        loop, train_loop_config=loop_config, torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus, resources_per_worker={"CPU": cpu_per_worker}),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=storage_path, callbacks=list(callbacks),
            # Worker failures: replaced 3 times. Placing the workers: a bounded wait, not Ray's
            # endless retries (cluster.placement_retries).
            failure_config=FailureConfig(max_failures=3, controller_failure_limit=cluster.placement_retries()),
            checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                               checkpoint_score_order=mode)),
        datasets=datasets,
        dataset_config=split_train(cpus - workers * cpu_per_worker, workers),
    )


def fit(torch_trainer, where: str, gpus: bool):
    """``torch_trainer.fit()``; workers the cluster could not place become one InputError
    naming ``where`` (``cluster.placement_failure``)."""
    from ray.train import TrainingFailedError

    try:
        return torch_trainer.fit()
    except TrainingFailedError as err:
        scaling = torch_trainer.scaling_config
        per_worker = worker_resources(scaling.resources_per_worker["CPU"], gpus)
        unplaced = cluster.placement_failure(where, scaling.num_workers, per_worker, err)
        if unplaced is None:
            raise
        raise unplaced from None


def keep_best(result, metric: str, mode: str, model_file: str, into: Path) -> list[dict]:
    """Copy the best checkpoint's ``model_file`` (by ``metric``, ``mode``) to ``into``; the
    history of the last checkpoint (every epoch's row). Raises where nothing was reported."""
    best = result.get_best_checkpoint(metric, mode) or result.checkpoint
    if best is None:
        raise InputError(Path(into).parent, "training reported no checkpoint")
    with best.as_directory() as folder:
        shutil.copy(Path(folder) / model_file, into)
    with result.checkpoint.as_directory() as folder:
        return read_file(Path(folder) / STATE)["history"]


# ---------------------------------------------------------------- the worker's side
def restore(checkpoint, load: Callable[[Path, dict], None]) -> tuple[int, list[dict]]:
    """Resume after a worker failure or `--resume`: ``load(folder, state)`` puts the task's
    weights and state back from the checkpoint's files; returns (epoch to start at, history),
    the last row marked ``resumed``. (0, []) without a checkpoint."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state = read_file(Path(folder) / STATE)
        load(Path(folder), state)
    history = state["history"]
    history[-1] = {**history[-1], "resumed": True}
    return state["epoch"], history


def report(metrics: dict, history: list[dict], rank: int, save: Callable[[Path], dict]) -> None:
    """Report an epoch's ``metrics`` on every rank (a barrier), rank 0 with a checkpoint:
    ``save(folder)`` writes the task's files and returns what else it resumes from, which
    goes into STATE with the epoch and the history."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write_state(Path(tmp), metrics["epoch"], history, save(Path(tmp)))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def write_state(folder: Path, epoch: int, history: list[dict], extra: dict) -> None:
    write_file(folder / STATE, {"epoch": epoch, "history": history, **extra})
