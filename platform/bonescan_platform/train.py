"""`bonescan train`: Ray Train's TorchTrainer around the plain-PyTorch engine.

``train_loop`` is the adapter each worker runs: dataset shard -> iter_torch_batches ->
engine.train_epoch -> ray.train.report (with a checkpoint). Everything about the model, the
loss and the metrics lives in bonescan_model; this file only wires it to Ray.

It writes a run folder (what it holds: ``runs``): the resolved config, the run's record, its
splits and budget (``splits``), Ray Train's checkpoints, the kept model (best by validation
DSC, with its threshold), the history (``val_*`` on the validation patients) and the kept
model's score on the test split, computed once at the end (``evaluate.score_test``).
The folder is local or in object storage (``storage``): for a URI the job works in a local
stage of the folder and Ray Train keeps train/ at the URI itself.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from bonescan_model import engine
from bonescan_model.augment import augment_batch
from bonescan_model.batching import repeated, two_stream
from bonescan_model.checkpoint import FILENAME, read_file, save_checkpoint, write_file
from bonescan_model.consistency import MeanTeacher, rampup
from bonescan_model.errors import InputError
from bonescan_model.loss import SemiSupervisedLoss
from bonescan_model.metrics import summarize
from bonescan_model.network import build_model
from bonescan_platform import metrics as training_metrics
from bonescan_platform import cluster, shards, splits, storage, stream, tracking
from bonescan_platform.evaluate import kept_score, score_test
from bonescan_platform.cluster import ray_session
from bonescan_platform.config import TrainConfig, check_fits, load_train_config, save_train_config
from bonescan_platform.runs import RUN_NAME, read_history, write_history

STATE = "train_state.pt"
# Rows a worker's shuffle buffer holds at most (a decoded row is 768 KiB: 512 rows ~ 0.4 GB).
# Up to that the buffer holds the worker's whole epoch (of the unlabeled stream, with
# two-stream batches), so each epoch is one seeded global shuffle: a batch mixes patients. (The
# shards keep augmented copies beside their original; a small window made most batches one
# patient.) Past it, mixing is within a window of this many rows.
SHUFFLE_ROWS = 512


# ---------------------------------------------------------------- the worker: a thin adapter
def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["train"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(loop_config["torch_threads"])
    torch.manual_seed(cfg.seed)
    model = ray.train.torch.prepare_model(build_model(cfg.model))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay)
    device = ray.train.torch.get_device()
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    loss_fn = loss_for(cfg)
    teacher = MeanTeacher(getattr(model, "module", model), decay=cfg.ema_decay) if cfg.semi == "mean_teacher" else None
    start, history = _restore(ray.train.get_checkpoint(), model, optimizer, teacher)
    tracker = tracking.Tracker.from_dict(loop_config.get("mlflow")) if rank == 0 else None
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    shuffle_rows = loop_config["shuffle_rows"]
    epochs = loop_config["epochs"]  # cfg.epochs, or those cfg.max_steps take (TrainConfig.plan)
    steps = history[-1].get("steps", 0) if history else 0
    if cfg.two_stream:  # the labeled stream, whole, in this worker's memory (stream.labeled_dataset)
        pool = labeled_pool(ray.train.get_dataset_shard("labeled"))
        epoch_batches_of = functools.partial(two_stream_batches, pool, loop_config["steps_per_epoch"])
    else:
        epoch_batches_of = epoch_batches
    upcoming = epoch_batches_of(train_shard, cfg, start, rank, shuffle_rows)
    for epoch in range(start, epochs):
        stats = engine.train_epoch(model, upcoming, loss_fn, optimizer, device=device, amp=cfg.amp, scaler=scaler,
                                   teacher=teacher, unsupervised_scale=rampup(epoch, cfg.rampup_epochs) if teacher else 1.0,
                                   max_steps=None if cfg.max_steps is None else cfg.max_steps - steps)
        steps += stats["steps"]
        if epoch + 1 < epochs:
            # Ray Data re-executes the dataset every epoch and its first batch takes 2-3 s to
            # arrive whatever the data's size (bench/RESULTS.md): start it now, behind validation
            # and the checkpoint, not in front of the next epoch's first step.
            upcoming = started_early(epoch_batches_of(train_shard, cfg, epoch + 1, rank, shuffle_rows))
        world = ray.train.get_context().get_world_size()
        # steps: optimizer steps so far (each a batch on every worker); samples: what they saw.
        seen = {k: history[-1].get(k, 0) if history else 0 for k in ("samples", "labeled_seen")}
        metrics = {"epoch": epoch + 1, "train_workers": world, "steps": steps,
                   "samples": seen["samples"] + stats["images"] * world,
                   # labeled samples the supervised term has seen so far (all workers)
                   "labeled_seen": seen["labeled_seen"] + stats["labeled_images"] * world,
                   **{f"train_{k}": v for k, v in stats.items()}}
        if rank == 0:  # validation on one rank: the split is small, and DDP needs no sync for it
            per_image = engine.evaluate(getattr(model, "module", model), val_shard.iter_torch_batches(
                batch_size=cfg.batch_size), device=device, threshold=cfg.threshold)
            metrics.update({f"val_{k}": v for k, v in summarize(per_image).items()})
        training_metrics.record(metrics, run=loop_config["run"], rank=rank)
        if tracker is not None:
            tracker.log_epoch(metrics)
        history.append(metrics)
        _report(metrics, history, model, optimizer, cfg, rank, teacher)


def loss_for(cfg: TrainConfig) -> SemiSupervisedLoss:
    return SemiSupervisedLoss(alpha=cfg.alpha, nu=cfg.nu, supervised=cfg.supervised, semi=cfg.semi,
                              length_weight=cfg.length_weight, unsupervised_weight=cfg.unsupervised_weight)


def epoch_batches(train_shard, cfg: TrainConfig, epoch: int, rank: int, shuffle_rows: int) -> Iterator[dict]:
    """One epoch of this worker's training batches, shuffled (over ``shuffle_rows``: the whole
    epoch up to SHUFFLE_ROWS) and augmented, seeded by (seed, epoch, rank)."""
    batches = train_shard.iter_torch_batches(
        batch_size=cfg.scans_per_batch, prefetch_batches=2,
        local_shuffle_buffer_size=shuffle_rows, local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank)
    if cfg.augment:
        batches = augmenting(batches, np.random.default_rng([cfg.seed, epoch, rank]))
    return iter(batches)


def labeled_pool(shard) -> dict[str, torch.Tensor]:
    """The labeled stream's rows, read once: {"image": (N, 2, H, W), "mask": (N, 1, H, W)}."""
    parts = list(shard.iter_torch_batches(batch_size=64))
    if not parts:
        raise ValueError("the labeled stream is empty: two-stream batches need labeled scans")
    return {k: torch.cat([p[k] for p in parts]) for k in ("image", "mask")}


def two_stream_batches(pool: dict[str, torch.Tensor], steps_per_epoch: int, unlabeled_shard, cfg: TrainConfig,
                       epoch: int, rank: int, shuffle_rows: int) -> Iterator[dict]:
    """One epoch of two-stream batches (bonescan_model.batching): ``steps_per_epoch`` steps of
    labeled_batch_size rows of the pool and unlabeled_batch_size rows of this worker's share of
    the unlabeled stream (read again, reshuffled, when an epoch needs more than one pass), then
    augmented; all seeded by (seed, epoch, rank). A supervised-only run (unsupervised_weight
    0) draws no unlabeled rows: nothing would use them."""
    def unlabeled_pass(number: int):
        return unlabeled_shard.iter_torch_batches(
            batch_size=max(1, cfg.unlabeled_scans_per_step), prefetch_batches=2, local_shuffle_buffer_size=shuffle_rows,
            local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank + number * 7_919)

    unlabeled = repeated(unlabeled_pass) if cfg.unsupervised_weight > 0 and cfg.unlabeled_batch_size else None
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    batches = two_stream(pool, cfg.labeled_scans_per_step, unlabeled, cfg.unlabeled_scans_per_step,
                         steps_per_epoch, rng)
    if cfg.augment:
        batches = augmenting(batches, rng)
    return iter(batches)


def started_early(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, its first item already being pulled on a background thread.

    Items come out in the same order as from ``batches``; an error raised while pulling the
    first one is raised to the consumer. The thread is a daemon: a worker that fails while a
    pull waits on the other ranks (the epoch barrier) can still exit."""
    first: list = []

    def pull() -> None:
        try:
            first.append(next(batches, _END))
        except BaseException as error:  # handed to the consumer below
            first.append(error)

    thread = threading.Thread(target=pull, name="next-epoch", daemon=True)
    thread.start()

    def handover() -> Iterator[dict]:
        thread.join()
        item = first[0]
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            return
        yield item
        yield from batches

    return handover()


_END = object()


def augmenting(batches: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
    """Random label-preserving geometric augmentation, per sample, on the worker."""
    for batch in batches:
        images, masks = augment_batch(batch["image"].numpy(), batch["mask"].numpy(), rng)
        yield {**batch, "image": torch.from_numpy(images), "mask": torch.from_numpy(masks)}


def _report(metrics: dict, history: list[dict], model, optimizer, cfg: TrainConfig, rank: int,
            teacher: MeanTeacher | None = None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:  # every rank reports (a barrier); rank 0 alone carries the checkpoint
            write_state(Path(tmp), model, optimizer, cfg, metrics, history, teacher)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def write_state(folder: Path, model, optimizer, cfg: TrainConfig, metrics: dict, history: list[dict],
                teacher: MeanTeacher | None = None) -> None:
    """One training checkpoint's files: the model (model.pt, what `evaluate` and `predict` load)
    and what resuming needs besides (train_state.pt: optimizer, epoch, history, the teacher)."""
    save_checkpoint(folder / FILENAME, model, cfg.model, epoch=metrics["epoch"], threshold=cfg.threshold,
                    metrics=metrics, train_config=_plain(cfg.to_dict()))
    state = {"optimizer": optimizer.state_dict(), "epoch": metrics["epoch"], "history": history}
    if teacher is not None:
        state["teacher"] = teacher.state_dict()
    write_file(folder / STATE, state)


def _restore(checkpoint, model, optimizer, teacher: MeanTeacher | None = None) -> tuple[int, list[dict]]:
    """Resume after a worker failure or `--resume`: weights, optimizer, epoch, history, and
    the mean teacher where the run has one."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        blob = read_file(Path(folder) / FILENAME)
        state = read_file(Path(folder) / STATE)
    getattr(model, "module", model).load_state_dict(blob["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if teacher is not None:
        if "teacher" not in state:  # a checkpoint of a run without one: cannot be this run's
            raise ValueError("the checkpoint has no mean teacher, but this run's semi is mean_teacher")
        teacher.load_state_dict(state["teacher"])
    history = state["history"]
    history[-1] = {**history[-1], "resumed": True}
    return state["epoch"], history


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- the driver
def train(data: str, config: str, out: str, workers: int = 1, gpus: bool = False, mlflow: str | None = None) -> int:
    """`bonescan train`. data, out: local folders or URIs (``storage``); a URI run folder is Ray
    Train's storage too, so checkpoints go there and `--resume` works from any machine.
    mlflow: a tracking URI (``tracking.tracking_uri``); the run's config, epochs, test scores
    and model go there, the model registered as ``bonescan-<run folder name>``."""
    uri = tracking.tracking_uri(mlflow)
    if uri:
        tracking.client(uri)  # without the extra: say so before anything is read or written
    cfg = load_train_config(config)
    check_fits(cfg, config, gpus)
    location, data = storage.absolute(out), storage.absolute(data)
    check_data(data)
    if workers < 1:
        raise InputError(out, "--workers must be at least 1")
    if storage.is_file(location):
        raise InputError(out, "is a file, not a run folder")
    storage.check_writable(location)
    with storage.staged(location, keep=own_file) as run:
        save_train_config(cfg, run / "config.yaml")
        record = {"data": data, "workers": workers, "gpus": gpus}
        if uri:
            record["mlflow"] = tracking.start(uri, run.name, _plain(cfg.to_dict()),
                                              tags={"bonescan.job": "train"}).to_dict()
        (run / "run.json").write_text(json.dumps(record, indent=2))
        return _fit(run, location, cfg, data, workers, gpus)


def own_file(relative: str) -> bool:
    """The run folder's files this code writes, not Ray Train's (``RUN_NAME/``, which Ray
    reads and writes at the storage location itself)."""
    return not relative.startswith(f"{RUN_NAME}/")


def check_data(data: str | Path) -> None:
    """Fail before Ray starts, naming the folder or file, on shards nothing can train on:
    not a shard folder, a manifest that is not one, a listed shard missing, no training rows."""
    if shards.split_rows(data, "train") == 0:
        raise InputError(data, "no training scans: the shards' train split has 0 rows (see the "
                               "ingest report for why scans were rejected)")


def resume(run_dir: str) -> int:
    """Continue a stopped run from its latest checkpoint, with its own config and data."""
    location = storage.absolute(run_dir)
    if not storage.is_file(storage.join(location, "run.json")):
        raise InputError(run_dir, "not a run folder (no run.json)")
    with storage.staged(location, keep=own_file) as run:
        info = json.loads((run / "run.json").read_text())
        cfg = load_train_config(run / "config.yaml")
        # MLflow: the same run (run.json); data: where the run first read it (a path or a URI).
        return _fit(run, location, cfg, info["data"], info["workers"], info["gpus"])


def trainer_for(run: Path, cfg: TrainConfig, data: str | Path, workers: int, gpus: bool, callbacks=(),
                cpu_per_worker: float | None = None, storage_path: str | None = None):
    """The TorchTrainer of one run; `bonescan tune` builds one per trial.

    run: the local run folder (its stage, for a run kept in object storage: ``storage``);
    storage_path: where Ray Train keeps the run's checkpoints (default: ``run`` itself).

    cpu_per_worker: the CPUs each worker reserves, and (one at least) the torch threads it runs;
    `bonescan tune` passes its share when several trials train at once. None: this run's
    workers share the cluster's CPUs, one left to Ray Data."""
    import ray
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bonescan_platform.loopback_torch import LoopbackTorchConfig

    cpus = ray.cluster_resources().get("CPU", 1)
    if cpu_per_worker is None:
        cpu_per_worker, torch_threads = worker_cpus(cpus, workers, gpus)
    else:
        torch_threads = max(1, int(cpu_per_worker))
    DataContext.get_current().enable_progress_bars = False
    selection = splits.for_config(data, cfg, workers)
    selection.save(run)
    chosen = selection.splits
    if not chosen.val:
        raise InputError(data, "no training patient with a mask to validate on: the run could not choose "
                               "its checkpoint (label some scans, or ingest more patients)")
    rows_per_worker = -(-selection.budget["training_rows"] // workers)
    return TorchTrainer(
        train_loop,
        # One machine's own Ray: DDP's rendezvous on 127.0.0.1 too, like every other port.
        torch_config=LoopbackTorchConfig() if cluster.on_loopback_ray() else None,
        train_loop_config={"train": _plain(cfg.to_dict()), "run": run.name,  # the dashboards' run tag
                           "mlflow": json.loads((run / "run.json").read_text()).get("mlflow"),
                           "torch_threads": torch_threads, "epochs": selection.budget["planned_epochs"],
                           "steps_per_epoch": selection.budget["planned_steps_per_epoch"],
                           "shuffle_rows": max(cfg.batch_size, min(rows_per_worker, SHUFFLE_ROWS))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus,
                                     resources_per_worker={"CPU": cpu_per_worker}),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=storage_path or str(run), callbacks=list(callbacks),
            # Worker failures: replaced 3 times. Placing the workers: a bounded wait, not Ray's
            # endless retries (cluster.placement_retries).
            failure_config=FailureConfig(max_failures=3, controller_failure_limit=cluster.placement_retries()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep,
                                               checkpoint_score_attribute="val_dsc",
                                               checkpoint_score_order="max")),
        datasets=training_datasets(data, cfg, selection),
        dataset_config=split_train(cpus - workers * cpu_per_worker),
    )


def training_datasets(data: str | Path, cfg: TrainConfig, selection) -> dict:
    """A run's datasets: "train" (mixed batches: every training row; two-stream: the
    unlabeled stream), "labeled" (two-stream: the labeled stream, given whole to every
    worker) and "val"."""
    labeled, val = list(selection.labeled), list(selection.splits.val)
    datasets = {"train": stream.training_dataset(data, labeled, cfg.dataset, without=val,
                                                 part="unlabeled" if cfg.two_stream else None),
                "val": stream.evaluation_dataset(data, "train", only=val)}
    if cfg.two_stream:
        if not selection.budget["labeled_rows"]:
            raise InputError(data, "two-stream batches (labeled_batch_size) need labeled scans, and this "
                                   "label budget labels none: raise label_fraction or labeled_scans")
        datasets["labeled"] = stream.labeled_dataset(data, labeled, cfg.dataset)
    return datasets


def worker_resources(cpu_per_worker: float, gpus: bool) -> dict[str, float]:
    """What one Train worker reserves: its CPUs, and a GPU with ``gpus`` (ScalingConfig's use_gpu)."""
    return {"CPU": cpu_per_worker, **({"GPU": 1.0} if gpus else {})}


def worker_cpus(cpus: float, workers: int, gpus: bool) -> tuple[float, int]:
    """(CPUs each worker reserves, torch threads it runs) for a run whose workers share the
    cluster's ``cpus``. A CPU is left to Ray Data: training workers holding every CPU starve
    the reader (docs/ray.md, "2-CPU deadlock")."""
    cpu_per_worker = 1.0 if gpus else max(0.25, min(1.0, (cpus - 1) / workers))
    return cpu_per_worker, max(1, int(os.cpu_count() // max(1, min(workers, cpus))))


def split_train(data_cpus: float):
    """The DataConfig of a trainer: "train" split across the workers, in order, Ray Data held
    to the ``data_cpus`` the workers leave (one at least)."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(
        preserve_order=True, resource_limits=ExecutionResources(cpu=max(1.0, data_cpus))))


def _fit(run: Path, location: str, cfg: TrainConfig, data: str, workers: int, gpus: bool) -> int:
    """Train the run staged at ``run`` whose home is ``location`` (the same folder when local)."""
    from ray.train import TrainingFailedError

    import ray

    with ray_session():
        cpu_per_worker, _ = worker_cpus(ray.cluster_resources().get("CPU", 1), workers, gpus)
        cluster.wait_for_room(location, workers, worker_resources(cpu_per_worker, gpus))
        trainer = trainer_for(run, cfg, data, workers, gpus, storage_path=location)
        storage.publish(run, location)  # config, run.json, splits: a killed driver's run resumes
        try:
            result = trainer.fit()
        except TrainingFailedError as err:
            per_worker = worker_resources(trainer.scaling_config.resources_per_worker["CPU"], gpus)
            unplaced = cluster.placement_failure(location, workers, per_worker, err)
            if unplaced is None:
                raise
            raise unplaced from None
    finish_run(run, result, location)
    tracker = tracking.Tracker.from_dict(json.loads((run / "run.json").read_text()).get("mlflow"))
    if tracker is not None:
        name = tracking.model_name(run.name)
        print(f"MLflow: run {tracker.run_id} at {tracker.uri}; model registered as {name} "
              f"version {tracker.register(name)}")
    return 0


def finish_run(run: Path, result, location: str | None = None) -> int:
    """Keep the best checkpoint by validation DSC as run/model.pt and the epoch history as
    run/history.csv; then ``conclude`` the run (its one test score, its MLflow run).
    location: where the run lives, when ``run`` is its local stage (named in the summary)."""
    best = result.get_best_checkpoint("val_dsc", "max") or result.checkpoint
    if best is None:
        raise InputError(run, "training reported no checkpoint")
    with best.as_directory() as folder:
        shutil.copy(Path(folder) / FILENAME, run / FILENAME)
    with result.checkpoint.as_directory() as folder:
        history = read_file(Path(folder) / STATE)["history"]
    write_history(run, history)
    return conclude(run, location)


def conclude(run: Path, location: str | None = None) -> int:
    """What a run does once its model is kept (model.pt, history): score it on the test split,
    once (run/test.json), and close its MLflow run. A run killed part way through this (a
    sweep's driver stopped as a trial ends) is concluded again when it resumes: the test score
    is kept where it scores this model.pt, the MLflow run finished only where it is not yet."""
    history = read_history(run)
    last, home = history[-1], location or str(run)
    cfg = load_train_config(run / "config.yaml")
    record = json.loads((run / "run.json").read_text())
    tested = kept_score(run) or score_test(run, record["data"], cfg.test_runs)
    tracker = tracking.Tracker.from_dict(record.get("mlflow"))
    if tracker is not None and not tracker.finished():
        tracker.finish(run, tested, {"epochs": last["epoch"],
                                     "best_val_dsc": max(r.get("val_dsc", 0.0) for r in history)})
    print(f"trained {last['epoch']} epochs ({last.get('steps', 0)} optimizer steps): validation DSC {last.get('val_dsc', float('nan')):.3f} "
          f"(best {max(r.get('val_dsc', 0.0) for r in history):.3f}, chooses the kept model); "
          f"kept model on the test split: DSC {tested.get('dsc', float('nan')):.3f}; "
          f"model: {storage.join(home, FILENAME)}, history: {storage.join(home, 'history.csv')}, "
          f"test: {storage.join(home, 'test.json')}")
    return 0
