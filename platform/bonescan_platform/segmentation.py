"""The segmentation task on the Train harness: the worker's loop, a run's trainer, a run's end.

``train_loop`` is the adapter each worker runs: dataset shard -> epoch batches
(``bonescan_model.batching``) -> ``engine.train_epoch`` -> ``harness.report`` (with a
checkpoint). Everything about the model, the loss and the metrics lives in bonescan_model;
this file only wires it to Ray. `bonescan train` runs one such run, `bonescan tune` one per
trial: both through ``trainer_for`` and ``finish``.

A run's checkpoint holds model.pt (what `evaluate` and `predict` load) and the harness's
state (optimizer, epoch, history, the mean teacher where the run has one). Its end
(``finish``): the best checkpoint by validation DSC kept as the run's model, the history
written, the kept model scored once on the test split (``scoring.score_test``), its MLflow
run closed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bonescan_model import engine
from bonescan_model.batching import epoch_batches, labeled_pool, started_early, two_stream_batches
from bonescan_model.checkpoint import FILENAME, read_file, save_checkpoint
from bonescan_model.consistency import MeanTeacher, rampup
from bonescan_model.errors import InputError
from bonescan_model.metrics import summarize
from bonescan_model.network import build_model
from bonescan_model.train_config import TrainConfig, loss_for
from bonescan_platform import harness, telemetry, tracking

if TYPE_CHECKING:
    from bonescan_platform.runs import Run

# The driver's side (trainer_for, finish, conclude) imports the run folder, the splits, the
# stream and the scoring where it runs: a Train worker unpickles train_loop by importing this
# module, and each worker of each run would otherwise pay for scipy.stats, pandas and
# scikit-image it never uses (~0.5 s of a worker's start on 2 cores).

# Rows a worker's shuffle buffer holds at most (a decoded row is 768 KiB: 512 rows ~ 0.4 GB).
# Up to that the buffer holds the worker's whole epoch (of the unlabeled stream, with
# two-stream batches), so each epoch is one seeded global shuffle: a batch mixes patients. (The
# shards keep augmented copies beside their original; a small window made most batches one
# patient.) Past it, mixing is within a window of this many rows.
SHUFFLE_ROWS = 512
KEPT_BY = ("val_dsc", "max")  # the checkpoint a run keeps: best DSC on its validation patients


# ---------------------------------------------------------------- the worker: a thin adapter
def _t(msg):
    import time
    with open("/tmp/prof/timeline.txt", "a") as f:
        f.write(f"{time.time():.2f} {msg}\n")


def train_loop(loop_config: dict) -> None:
    _t("worker: train_loop starts")
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
    start, history = harness.restore(ray.train.get_checkpoint(), functools.partial(load_state, model, optimizer, teacher))
    tracker = tracking.Tracker.from_dict(loop_config.get("mlflow")) if rank == 0 else None
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    shuffle_rows, epochs = loop_config["shuffle_rows"], loop_config["epochs"]  # epochs: TrainConfig.plan's
    steps = history[-1].get("steps", 0) if history else 0
    if cfg.two_stream:  # the labeled stream, whole, in this worker's memory (stream.labeled_dataset)
        pool = labeled_pool(ray.train.get_dataset_shard("labeled"))
        epoch_batches_of = functools.partial(two_stream_batches, pool, loop_config["steps_per_epoch"])
    else:
        epoch_batches_of = epoch_batches
    upcoming = epoch_batches_of(train_shard, cfg, start, rank, shuffle_rows)
    _t("worker: set up, first epoch")
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
        kept = "student"
        if rank == 0:  # validation on one rank: the split is small, and DDP needs no sync for it
            kept, scores = validate(getattr(model, "module", model), teacher, val_shard, cfg, device)
            metrics.update(scores)
        telemetry.record(metrics, run=loop_config["run"], rank=rank)
        if tracker is not None:
            tracker.log_epoch(metrics)
        history.append(metrics)
        harness.report(metrics, history, rank,
                       functools.partial(save_state, model, optimizer, cfg, metrics, teacher, kept))


def validate(student, teacher: MeanTeacher | None, val_shard, cfg: TrainConfig, device) -> tuple[str, dict]:
    """The epoch's validation scores (``val_*``) and which weights they are of: the student's,
    or, with a mean teacher, whichever of student and teacher scores the higher validation DSC
    (both logged: ``val_student_dsc``, ``val_teacher_dsc``). The method rests on the teacher
    being the better model (Tarvainen & Valpola 2017 evaluate their EMA weights); where it is
    not, keeping it would throw the student's gain away, so validation decides, as it decides
    the kept epoch."""
    def scores(net) -> dict:
        per_image = engine.evaluate(net, val_shard.iter_torch_batches(batch_size=cfg.batch_size), device=device,
                                    threshold=cfg.threshold)
        return summarize(per_image)

    mine = scores(student)
    if teacher is None:
        return "student", {f"val_{k}": v for k, v in mine.items()}
    theirs = scores(teacher.model)
    kept = "teacher" if theirs["dsc"] > mine["dsc"] else "student"  # NaN (no lesion scan) keeps the student
    chosen = theirs if kept == "teacher" else mine
    return kept, {**{f"val_{k}": v for k, v in chosen.items()}, "val_student_dsc": mine["dsc"],
                  "val_teacher_dsc": theirs["dsc"], "kept_weights": kept}


def save_state(model, optimizer, cfg: TrainConfig, metrics: dict, teacher: MeanTeacher | None, kept: str,
               folder: Path) -> dict:
    """A checkpoint's model.pt (the kept weights, ``kept``: the student's or the teacher's, with
    the config and threshold: what `evaluate` and `predict` load); returns what else resuming
    needs (the optimizer; with a teacher, the teacher and the student's own weights)."""
    keep = teacher.model if kept == "teacher" else model
    save_checkpoint(folder / FILENAME, keep, cfg.model, epoch=metrics["epoch"], threshold=cfg.threshold,
                    metrics=metrics, train_config=cfg.to_plain(), kept_weights=kept)
    state = {"optimizer": optimizer.state_dict()}
    if teacher is not None:
        state["teacher"] = teacher.state_dict()
        module = getattr(model, "module", model)
        state["student"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return state


def load_state(model, optimizer, teacher: MeanTeacher | None, folder: Path, state: dict) -> None:
    """``save_state`` undone: the student's weights, optimizer, and the mean teacher where the
    run has one."""
    weights = state["student"] if "student" in state else read_file(folder / FILENAME)["state_dict"]
    getattr(model, "module", model).load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    if teacher is not None:
        if "teacher" not in state:  # a checkpoint of a run without one: cannot be this run's
            raise ValueError("the checkpoint has no mean teacher, but this run's semi is mean_teacher")
        teacher.load_state_dict(state["teacher"])


# ---------------------------------------------------------------- the driver's side
def check_data(data: str | Path) -> None:
    """Fail before Ray starts, naming the folder or file, on shards nothing can train on:
    not a shard folder, a manifest that is not one, a listed shard missing, no training rows."""
    from bonescan_platform import shards

    if shards.split_rows(data, "train") == 0:
        raise InputError(data, "no training scans: the shards' train split has 0 rows (see the "
                               "ingest report for why scans were rejected)")


def trainer_for(run: Run, callbacks=(), cpu_per_worker: float | None = None):
    """The TorchTrainer of one run (its config and record: ``Run.create``); Ray Train keeps
    its checkpoints at the run's home (a URI where the run lives in object storage).

    cpu_per_worker: the CPUs each worker reserves, and (one at least) the torch threads it runs;
    `bonescan tune` passes its share when several trials train at once. None: this run's
    workers share the cluster's CPUs, one left to Ray Data."""
    import ray

    from bonescan_platform import cluster, splits
    from bonescan_platform.loopback_torch import LoopbackTorchConfig

    cfg, record = run.config, run.record
    workers, gpus = record.workers, record.gpus
    if cpu_per_worker is None:
        cpu_per_worker, torch_threads = harness.worker_cpus(ray.cluster_resources().get("CPU", 1), workers, gpus)
    else:
        torch_threads = max(1, int(cpu_per_worker))
    selection = splits.for_config(record.data, cfg, workers)
    run.save_selection(selection)
    if not selection.splits.val:
        raise InputError(record.data, "no training patient with a mask to validate on: the run could not choose "
                                      "its checkpoint (label some scans, or ingest more patients)")
    rows_per_worker = -(-selection.budget["training_rows"] // workers)
    return harness.trainer(
        train_loop,
        {"train": cfg.to_plain(), "run": run.name,  # the dashboards' run tag
         "mlflow": record.mlflow, "torch_threads": torch_threads,
         "epochs": selection.budget["planned_epochs"], "steps_per_epoch": selection.budget["planned_steps_per_epoch"],
         "shuffle_rows": max(cfg.batch_size, min(rows_per_worker, SHUFFLE_ROWS))},
        storage_path=run.home, workers=workers, gpus=gpus, cpu_per_worker=cpu_per_worker,
        datasets=training_datasets(record.data, cfg, selection), metric=KEPT_BY[0], mode=KEPT_BY[1],
        keep=cfg.checkpoints_to_keep, callbacks=callbacks,
        # One machine's own Ray: DDP's rendezvous on 127.0.0.1 too, like every other port.
        torch_config=LoopbackTorchConfig() if cluster.on_loopback_ray() else None)


def training_datasets(data: str | Path, cfg: TrainConfig, selection) -> dict:
    """A run's datasets: "train" (mixed batches: every training row; two-stream: the
    unlabeled stream), "labeled" (two-stream: the labeled stream, given whole to every
    worker) and "val"."""
    from bonescan_platform import stream

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


def finish(run: Run, result) -> None:
    """Keep the best checkpoint by validation DSC as the run's model and the epoch history;
    then ``conclude`` the run (its one test score, its MLflow run)."""
    run.write_history(harness.keep_best(result, *KEPT_BY, FILENAME, run.model_path))
    conclude(run)


def finish_from_checkpoints(run: Run, epochs: int = 1) -> bool:
    """``finish`` a run that did not return from fit() (a trial ASHA stopped, a driver that
    died), from Ray Train's Result of its checkpoints (``Run.train_result``), if they reach
    ``epochs``. False: nothing written. A run in object storage has its checkpoints fetched
    from there first."""
    from bonescan_platform import storage
    from bonescan_platform.runs import RUN_NAME

    if run.location and storage.is_uri(run.location):
        storage.download(storage.join(run.location, RUN_NAME), run.root / RUN_NAME)
    result = run.train_result()
    if result is None or result.metrics.get("epoch", 0) < epochs:
        return False
    finish(run, result)
    return True


def conclude(run: Run) -> dict:
    """What a run does once its model is kept (model.pt, history): score it on the test split,
    once, and close its MLflow run. A run killed part way through this (a sweep's driver
    stopped as a trial ends) is concluded again when it resumes: the test score is kept where
    it scores this model.pt, the MLflow run finished only where it is not yet. Returns the
    test score."""
    from bonescan_platform import scoring
    from bonescan_platform.runs import HISTORY_CSV, TEST

    history = run.history
    last = history[-1]
    best_val = max(r.get("val_dsc", 0.0) for r in history)
    tested = run.test_score or scoring.score_test(run)
    tracker = run.tracker
    if tracker is not None and not tracker.finished():
        tracker.finish(run.artifacts(), tested, {"epochs": last["epoch"], "best_val_dsc": best_val})
    print(f"trained {last['epoch']} epochs ({last.get('steps', 0)} optimizer steps): validation DSC "
          f"{last.get('val_dsc', float('nan')):.3f} (best {best_val:.3f}, chooses the kept model); "
          f"kept model on the test split: DSC {tested.get('dsc', float('nan')):.3f}; "
          f"model: {run.where(FILENAME)}, history: {run.where(HISTORY_CSV)}, test: {run.where(TEST)}")
    return tested
