"""`bonescan tune`: a Ray Tune sweep over a space file, one Ray Train run per trial.

The pattern Ray 2.60 recommends for Tune over Train (docs/ray.md, "Tune over Train"): the Tune
function trainable ``run_trial`` builds the trial's TorchTrainer with ``segmentation.trainer_for`` and
calls ``fit()``; ``TuneReportCallback`` forwards every epoch's metrics to Tune, where ASHA reads
them. A trial's run folder is named after its trial id, so a resumed sweep resumes each
unfinished trial's own Train run from its latest checkpoint.

The experiment folder and its trials' run folders are ``runs``'s: what they hold, and how they
are read. This module runs the sweep and makes the results table (one row per trial:
parameters, config, metrics, size, timings) from Ray Tune's ResultGrid and the trials' Runs.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pyarrow as pa

from bonescan_model.errors import InputError
from bonescan_model.train_config import check_fits
from bonescan_platform import comparisons, nnunet_baseline, scoring, segmentation, storage, stream, tracking
from bonescan_platform.cluster import ray_session
from bonescan_platform.runs import RUN_NAME, TUNE_NAME, Experiment, Plan, Run, RunRecord, Trial
from bonescan_platform.scoring import HEADLINE
from bonescan_platform.search_space import AUTO, SearchSpace, case_name

DRIVER_CPU = 0.25  # each trial's Tune function only waits on its TorchTrainer
# Ray Data's read-and-decode tasks take 1 CPU each: a CPU left free keeps the streams of all
# trials flowing (docs/ray.md, "2-CPU deadlock").
DATA_CPU = 1.0


# ---------------------------------------------------------------- resources
def plan_resources(space: SearchSpace, cluster: dict) -> Plan:
    """Trials at once and CPUs per worker for ``ray.cluster_resources()``-like ``cluster``.

    Each trial holds DRIVER_CPU for its Tune function and workers * cpu_per_worker for its
    TorchTrainer; DATA_CPU stays free. With GPUs, one GPU per worker bounds the trials.
    """
    cpus, n_gpus = float(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    res = space.resources
    workers = res["workers"]
    gpus = n_gpus > 0 if res["gpus"] == AUTO else res["gpus"]
    if gpus and n_gpus < workers:
        raise InputError(space.source, f"resources.gpus: a trial needs {workers} GPU(s), the cluster has {n_gpus}")
    spare = cpus - DATA_CPU
    fixed = res["cpus_per_worker"]
    if space.max_concurrent_trials == AUTO:
        per_trial = DRIVER_CPU + workers * (1.0 if fixed == AUTO else fixed)
        trials = max(1, int(spare // per_trial))
        if gpus:
            trials = min(trials, n_gpus // workers)
    else:
        trials = space.max_concurrent_trials
    cpu = fixed if fixed != AUTO else (1.0 if gpus else round((spare / trials - DRIVER_CPU) / workers, 4))
    if cpu <= 0 or trials * (DRIVER_CPU + workers * cpu) > spare + 1e-9:
        raise InputError(space.source, (
            f"max_concurrent_trials: {trials} trials of {workers} worker(s) need more than this cluster's "
            f"{cpus:g} CPUs: each trial takes {DRIVER_CPU} CPU for its driver plus its workers' CPUs, "
            f"and {DATA_CPU:g} CPU stays free for Ray Data"))
    return Plan(trials=trials, workers=workers, cpu_per_worker=cpu, gpus=gpus)


# ---------------------------------------------------------------- the Tune function: one trial
def run_trial(config: dict, experiment: str) -> None:
    """One trial: the TorchTrainer of ``segmentation.trainer_for``, its epochs reported to Tune.

    experiment: the experiment's location. In object storage, the trial reads the
    experiment's own files from a local copy and writes its run folder through a local stage
    on whatever node it runs (``storage``), Ray Train keeping its checkpoints at the URI."""
    from ray import tune as ray_tune

    with storage.fetched(experiment, keep=lambda relative: "/" not in relative) as root:
        exp = Experiment.open(root, experiment if storage.is_uri(experiment) else "")
        trial_id = ray_tune.get_context().get_trial_id()
        with storage.staged(exp.run_location(trial_id), keep=Run.own_file) as root:
            _trial(exp, config, exp.trial_run(trial_id, root))


def _trial(exp: Experiment, config: dict, run: Run) -> None:
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = run.name
    cfg = exp.space.trial_config(config, f"trial {trial_id}")
    check_fits(cfg, f"trial {trial_id}", exp.resource_plan().gpus)
    earlier = run.record
    if earlier is not None:  # a trial started again
        if run.has_history:
            if cfg.trainer == "bonescan":  # what a stop cut short: its test score, its MLflow run
                segmentation.conclude(run)
        else:  # its last epoch was saved, its model.pt not yet (finish concludes it)
            segmentation.finish_from_checkpoints(run, run.planned_epochs)
        if run.has_history:
            # Trained to the end before the sweep's driver stopped, after Tune last saved its
            # state: give Tune the epochs again instead of training again.
            for row in run.history:
                ray_tune.report(row)
            return
    plan = exp.resource_plan()
    mlflow = earlier.mlflow if earlier is not None else None  # a trial started again keeps its own child run
    if exp.tracker is not None and mlflow is None:
        mlflow = tracking.start(
            exp.tracker.uri, f"{storage.name(exp.home)}/{trial_id}", {**cfg.to_plain(), "trial": config},
            tags={"bonescan.job": "trial", "bonescan.trial": trial_id}, parent=exp.tracker).to_dict()
    run = Run.create(run.root, cfg, RunRecord(data=exp.data, workers=plan.workers, gpus=plan.gpus,
                                              trainer=cfg.trainer, mlflow=mlflow), run.location)
    run.write_trial(Trial(trial_id=trial_id, params=config, label=trial_label(config)))
    if cfg.trainer == "nnunet":  # nnU-Net's own pipeline, in its own Ray task; its epochs reported after
        nnunet_baseline.train_and_score(run, plan.gpus)
        storage.publish(run.root, run.home)
        for row in run.history:
            ray_tune.report(row)
        return
    trainer = segmentation.trainer_for(run, callbacks=[TuneReportCallback()], cpu_per_worker=plan.cpu_per_worker)
    storage.publish(run.root, run.home)
    segmentation.finish(run, trainer.fit())


def track_best(exp: Experiment, rows: list[dict]) -> None:
    """The sweep's parent MLflow run: the trial kept by the space's metric on the validation
    split (never the test split), registered as ``bonescan-<experiment name>``."""
    best, best_value = None, None
    for row in rows:
        run = exp.trial_run(row["trial_id"])
        values = [r[exp.space.metric] for r in run.history if exp.space.metric in r]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if not values or not run.model_path.exists():
            continue
        value = max(values) if exp.space.mode == "max" else min(values)
        if best is None or (value > best_value if exp.space.mode == "max" else value < best_value):
            best, best_value = row, value
    parent = exp.tracker
    if best is None:
        print("MLflow: no trial kept a model; nothing registered")
        return
    child = exp.trial_run(best["trial_id"]).tracker
    parent.log_metrics({f"best_{exp.space.metric}": best_value, "trials": len(rows),
                        **{f"best_trial_test_{k}": best[k] for k in HEADLINE}})
    name = tracking.model_name(storage.name(exp.home))
    version = child.register(name)
    client = tracking.client(parent.uri)
    client.set_tag(parent.run_id, "bonescan.best_trial", best["trial_id"])
    client.set_terminated(parent.run_id, "FINISHED")
    print(f"MLflow: sweep run {parent.run_id} at {parent.uri}; trial {best['trial_id']} (best "
          f"{exp.space.metric} {best_value:.3f}, validation) registered as {name} version {version}")


def trial_label(params: dict) -> str:
    return ", ".join(f"{name}={case_name(value)}" for name, value in params.items())


def _trial_dirname(trial) -> str:
    return trial.trial_id  # short and stable: runs/<trial id> and tune/<trial id> pair up


# ---------------------------------------------------------------- the driver
def sweep(data: str, space: str, out: str, resume: bool = False, mlflow: str | None = None) -> int:
    """`bonescan tune`: run (or with ``resume``, continue) the sweep ``space`` into ``out``.

    mlflow: a tracking URI (``tracking.tracking_uri``): the sweep a parent run, each trial a child
    run, the trial kept by the space's validation metric registered as ``bonescan-<out name>``."""
    from ray import tune as ray_tune

    location, data_dir, space_path = storage.absolute(out), storage.absolute(data), Path(space).resolve()
    remote = location if storage.is_uri(location) else ""
    uri = tracking.tracking_uri(mlflow)
    if uri and not resume:
        tracking.client(uri)  # without the extra: say so before anything is read or written
    segmentation.check_data(data_dir)  # shards nothing can train on fail here, named
    storage.check_writable(location)
    with storage.staged(location, keep=_driver_file) as root:
        if resume:
            exp = Experiment.open(root, remote)
            for flag, given, recorded in (("--data", data_dir, exp.data), ("--space", space_path, exp.record["space"])):
                if str(given) != str(recorded):
                    raise InputError(location, f"was started with {flag} {recorded}; resume with the same")
        elif Experiment.is_experiment(root):
            raise InputError(location, "already holds an experiment: add --resume to continue it, or choose another --out")
        else:
            exp = Experiment.create(root, data_dir, space_path, uri, remote)  # validates the space before writing

        if exp.space.uses_trainer("nnunet"):
            nnunet_baseline.check_installed()  # before any trial starts, not as each nnU-Net trial's error
        with ray_session():
            import ray

            plan = plan_resources(exp.space, ray.cluster_resources())
            exp = exp.save_resource_plan(plan)
            storage.publish(root, location)  # the trials read the experiment from its location
            print(f"sweep {exp.space.source}: {plan.trials} trial(s) at once, {plan.workers} worker(s) each "
                  f"at {plan.cpu_per_worker:g} CPU{' + 1 GPU' if plan.gpus else ''}")
            trainable = ray_tune.with_resources(functools.partial(run_trial, experiment=exp.home),
                                                {"cpu": DRIVER_CPU})
            state = storage.join(exp.home, TUNE_NAME)
            if resume and ray_tune.Tuner.can_restore(state):
                tuner = ray_tune.Tuner.restore(state, trainable=trainable, resume_unfinished=True,
                                               resume_errored=True)
            else:
                tuner = _new_tuner(exp, plan, trainable)
            grid = tuner.fit()
        if remote:  # what the trials wrote, wherever they ran
            storage.download(remote, root, keep=_driver_file)
        errors = [f"{Path(r.path).name}: {type(r.error).__name__}: {r.error}" for r in grid if r.error]
        rows = collect(root, remote, grid)
        print_summary(rows, exp.space)
        print_comparisons(exp.comparisons())
        if exp.tracker is not None:
            track_best(exp, rows)
    for line in errors:
        print(f"trial failed: {line}")
    print(f"results: {storage.join(location, 'results.parquet')}, {storage.join(location, 'results.csv')}; "
          f"TensorBoard: tensorboard --logdir {location}")
    return 1 if errors else 0


def _driver_file(relative: str) -> bool:
    """What the sweep's driver reads and writes of the experiment folder: all but Ray's own
    (Tune's state in ``tune/``, each run's Train checkpoints in ``runs/<trial>/train/``)."""
    parts = relative.split("/")
    return not (parts[0] == TUNE_NAME or (parts[0] == "runs" and len(parts) > 3 and parts[2] == RUN_NAME))


def _new_tuner(exp: Experiment, plan: Plan, trainable):
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    space = exp.space
    scheduler = None
    if space.scheduler:
        # time is the epoch each report carries; stop_last_trials=False lets a trial that
        # reaches max_t return from fit() and keep its model like any run.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=space.max_epochs(),
                                  grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor, stop_last_trials=False)
    return ray_tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=ray_tune.TuneConfig(
            metric=space.metric, mode=space.mode, scheduler=scheduler, num_samples=1,
            # The limit goes to the generator itself: Tune ignores max_concurrent_trials when
            # it is handed a BasicVariantGenerator, and trials beyond the plan starve Ray Data.
            search_alg=BasicVariantGenerator(random_state=space.search.random_state,
                                             max_concurrent=plan.trials),
            trial_dirname_creator=_trial_dirname),
        run_config=ray_tune.RunConfig(
            name=TUNE_NAME, storage_path=exp.home, verbose=1,
            # A trial whose Tune function died is started once more; its Train run resumes
            # from its own checkpoint. Worker failures are Ray Train's (harness.trainer).
            failure_config=ray_tune.FailureConfig(max_failures=1)),
    )


# ---------------------------------------------------------------- the results table
def collect(experiment: str | Path, location: str = "", grid=None) -> list[dict]:
    """One row per trial, from its Run and Ray Tune's ResultGrid (``grid``: the sweep's; its
    trials' wall times) -> the experiment's results table.

    Trials that ASHA stopped get their model, history and test score here, from their
    checkpoints (``segmentation.finish_from_checkpoints``); a kept model without a test score
    (a driver stopped between the two) is scored here, once. Nothing reads the test split
    before a model is kept. location: where the experiment lives when ``experiment`` is its
    local stage."""
    exp = Experiment.open(experiment, location)
    seconds = trial_seconds(grid)
    crops = None
    rows = []
    for run in exp.trial_runs():
        if not run.has_history:
            segmentation.finish_from_checkpoints(run, 1)
        if run.model_path.exists() and run.test_score is None:
            crops = crops if crops is not None else stream.crops(exp.data, "test")
            scoring.score_test(run, crops)
        rows.append(_row(exp, run, seconds.get(run.name, float("nan"))))
    if rows:
        exp.write_results(pa.Table.from_pylist(rows))
        exp.write_comparisons(comparisons.table(rows, exp.space, exp.trial_runs()))
    return rows


def _row(exp: Experiment, run: Run, trial_seconds: float) -> dict:
    trial, cfg, history, budget = run.trial, run.config, run.history, run.budget
    tested = run.any_test_score or {}
    params = trial.params
    epochs = int(history[-1]["epoch"]) if history else 0
    max_epochs = run.planned_epochs
    best = max(history, key=lambda r: r.get("val_dsc", -1.0)) if history else {}
    nan = float("nan")
    row = {
        "trial_id": trial.trial_id,
        "status": "error" if not history else ("stopped" if epochs < max_epochs else "finished"),
        "label": trial.label,
        **{name: (case_name(params[name]) if isinstance(params.get(name), dict) else params.get(name))
           for name in exp.space.names},
        "seed": cfg.seed,
        **{k: budget.get(k, -1) for k in ("labeled_scans", "labeled_patients", "train_scans", "train_patients",
                                          "val_scans", "val_patients", "test_scans", "all_scans", "training_rows",
                                          "training_samples", "labeled_samples")},
        **{k: budget.get(k, nan) for k in ("labeled_share_of_train", "labeled_share_of_all")},
        "epochs": epochs, "max_epochs": max_epochs,
        "steps": int(history[-1].get("steps", -1)) if history else 0,
        "samples_seen": int(history[-1].get("samples", -1)) if history else 0,
        # Test split, kept model, scored once: run 0 is the headline; protocol_*: the paper's runs.
        **{k: tested.get(k, nan) for k in HEADLINE},
        "lesion_images": tested.get("lesion_images", 0),
        **{f"protocol_{k}": tested.get("runs_mean", {}).get(k, nan) for k in ("dsc", "cpa", "recall")},
        **{f"protocol_{k}_std": tested.get("runs_std", {}).get(k, nan) for k in ("dsc", "cpa", "recall")},
        "evaluate_runs": len(tested.get("runs", [])),
        "best_epoch": int(best.get("epoch", 0)),
        "best_val_dsc": best.get("val_dsc", nan),
        **{f"final_{k}": history[-1].get(k, nan) if history else nan
           for k in ("val_dsc", "val_cpa", "val_recall", "train_loss")},
        "parameters": tested.get("parameters", 0),
        "test_seconds": tested.get("test_seconds", nan), "test_images": tested.get("images", 0),
        "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in history)),
        "trial_seconds": trial_seconds,
        "run": run.home,
        "config": json.dumps(cfg.to_dict()),
    }
    return row


def trial_seconds(grid) -> dict[str, float]:
    """Each trial's wall time in Ray Tune, by trial id, from a ResultGrid's reported
    ``time_total_s``: summed over the sessions of a resumed sweep (a trial started again counts
    from zero, and its results append). {} without a grid."""
    seconds = {}
    for result in grid or ():
        frame = result.metrics_dataframe
        if frame is None or "time_total_s" not in frame:
            continue
        times = [float(t) for t in frame["time_total_s"]]
        ends = [t for t, after in zip(times, times[1:] + [0.0]) if after < t]  # each session's last
        seconds[Path(result.path).name] = float(sum(ends))
    return seconds


def print_summary(rows: list[dict], space: SearchSpace) -> None:
    print(f"{len(rows)} trials, kept by {space.metric} ({space.mode}) on the validation split; "
          f"each kept model scored once on the test split:")
    for row in rows:
        print(f"  {row['trial_id']}  {row['label'] or '(base)'}  seed {row['seed']}: {row['status']} after "
              f"{row['epochs']} epochs, {row['labeled_scans']} labeled scans; best val DSC "
              f"{_fmt(row['best_val_dsc'])}; test DSC {_fmt(row['dsc'])}, CPA {_fmt(row['cpa'])}, "
              f"Recall {_fmt(row['recall'])}, lesion sensitivity {_fmt(row['lesion_sensitivity'], 2)}; "
              f"{row['parameters'] / 1e6:.3f}M parameters, test {_fmt(row['test_seconds'], 2)} s")


def print_comparisons(table: list[dict]) -> None:
    """The arms against their control (comparisons.py), one line each, verdict last."""
    if table:
        print("arms against their control, paired by seed (test DSC, arm - control; rule: docs/design.md):")
    for row in table:
        where = f" at {row['where']}" if row["where"] else ""
        print(f"  {row['arm']} vs {row['control']}{where}: {row['n']} paired seeds, difference "
              f"{_fmt(row['mean_diff'])} (95 % CI {_fmt(row['ci95_low'])} to {_fmt(row['ci95_high'])}, "
              f"p {_fmt(row['p_value'])}): {row['verdict']}")


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
