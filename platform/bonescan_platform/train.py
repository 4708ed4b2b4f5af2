"""`bonescan train`: one segmentation run on Ray Train, into a run folder.

The run's task, trainer and end are ``segmentation``'s; its folder is ``runs.Run``'s (the
resolved config, the record, splits and budget, Ray Train's checkpoints, the kept model, the
history with ``val_*`` on the validation patients, and the kept model's one test score). The
folder is local or in object storage (``storage``): for a URI the job works in a local stage
of the folder and Ray Train keeps train/ at the URI itself.
"""

from __future__ import annotations

from bonescan_model.errors import InputError
from bonescan_model.train_config import check_fits, load_train_config
from bonescan_platform import cluster, harness, segmentation, storage, tracking
from bonescan_platform.cluster import ray_session
from bonescan_platform.runs import RECORD, Run, RunRecord


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
    segmentation.check_data(data)
    if workers < 1:
        raise InputError(out, "--workers must be at least 1")
    if storage.is_file(location):
        raise InputError(out, "is a file, not a run folder")
    storage.check_writable(location)
    with storage.staged(location, keep=Run.own_file) as root:
        tracker = tracking.start(uri, root.name, cfg.to_plain(),
                                 tags={"bonescan.job": "train"}) if uri else None
        record = RunRecord(data=data, workers=workers, gpus=gpus, mlflow=tracker.to_dict() if tracker else None)
        return _fit(Run.create(root, cfg, record, location))


def resume(run_dir: str) -> int:
    """Continue a stopped run from its latest checkpoint, with its own config and data (and
    MLflow run: the record's; data: where the run first read it, a path or a URI)."""
    location = storage.absolute(run_dir)
    if not Run.started(location):
        raise InputError(run_dir, f"not a run folder (no {RECORD})")
    with storage.staged(location, keep=Run.own_file) as root:
        return _fit(Run.open(root, location))


def _fit(run: Run) -> int:
    """Train the run (staged at ``run.root``, living at ``run.home``) and finish it."""
    import ray

    with ray_session():
        record = run.record
        cpu_per_worker, _ = harness.worker_cpus(ray.cluster_resources().get("CPU", 1), record.workers, record.gpus)
        cluster.wait_for_room(run.home, record.workers, harness.worker_resources(cpu_per_worker, record.gpus))
        trainer = segmentation.trainer_for(run)
        storage.publish(run.root, run.home)  # config, run.json, splits: a killed driver's run resumes
        from bonescan_platform.segmentation import _t
        _t("driver: fit")
        result = harness.fit(trainer, run.home, record.gpus)
        _t("driver: fit returned")
    segmentation.finish(run, result)
    tracker = run.tracker
    if tracker is not None:
        name = tracking.model_name(run.name)
        print(f"MLflow: run {tracker.run_id} at {tracker.uri}; model registered as {name} "
              f"version {tracker.register(name)}")
    return 0
