"""`bonescan predict`: whole-body DICOM -> lesion mask, LabelMe contours and overlay per scan.

One scan (a file, or a folder holding one series) runs in this process: starting Ray would
cost more than the prediction. A folder of several series is a Ray Data batch job: the driver
groups files per series from headers alone, then a pool of actors, each loading the checkpoint
once, reads, crops and predicts a batch of scans and writes their outputs.
A bad file is reported with its reason and skipped; the other scans still get their outputs.
With ``--seg`` each scan also gets ``<name>.seg.dcm``, a DICOM Segmentation of its source files
(``bonescan_model.io.seg``, the ``seg`` extra: highdicom), imported only then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from bonescan_model.checkpoint import load_model
from bonescan_model.progress import progress
from bonescan_model.errors import InputError, describe, quoted, shown
from bonescan_model.io.deid import default_secret_path, load_or_create_secret
from bonescan_model.io.dicom import group_series, scan_name
from bonescan_model.io.files import find_files
from bonescan_model.inference import output_paths, predict_scans, read_and_crop, reference_view, write_prediction
from bonescan_platform import storage
from bonescan_platform.cluster import ray_session

# Scans per actor call: what an actor reads, predicts and writes before it reports back (the
# network then takes them one crop at a time on a CPU, all at once on a GPU: predict_masks).
BATCH_SCANS = 8
# Each actor holds its own copy of the model and one CPU; reading and writing, most of a
# scan's time (bench/predict.py), scale with actors, but a shared cluster keeps its other CPUs.
MAX_ACTORS = 8


def plan_scans(dicom: Path, out_dir: str | Path, secret: bytes) -> tuple[list[dict], list[InputError]]:
    """From headers alone: one task per series, {"files", "out_dir", "name"}, and the files
    that are not DICOM.

    Outputs keep the input's sub-folders (PACS exports often name files IM00001 in one folder
    per study), and a name taken twice in one folder gets a _2, _3 suffix, so no scan's outputs
    overwrite another's. Files under ``out_dir`` are skipped: a rerun into a folder inside the
    input does not read its own outputs. out_dir: a local folder or a URI (``storage``).
    """
    out_dir = str(out_dir)
    files, skipped = find_files(dicom, exclude=None if storage.is_uri(out_dir) else Path(out_dir))
    root = dicom if dicom.is_dir() else dicom.parent
    groups, unreadable = group_series(files, secret)
    tasks, taken = [], set()
    for group in groups:
        relative = group.files[0].parent.relative_to(root).as_posix()
        folder = out_dir if relative == "." else storage.join(out_dir, *relative.split("/"))
        name = base = scan_name(list(group.files))
        suffix = 1
        while (folder, name) in taken:
            suffix += 1
            name = f"{base}_{suffix}"
        taken.add((folder, name))
        tasks.append({"files": [str(f) for f in group.files], "out_dir": folder, "name": name})
    return tasks, skipped + unreadable


def predict_batch(model: nn.Module, tasks: list[dict], secret: bytes, threshold: float) -> list[dict]:
    """Read and crop the scans of ``tasks``, predict them (``predict_scans``), write their
    outputs; a lesion pixel is sigmoid > ``threshold``, the checkpoint's own. One status row per task: file, output (out_dir/name, the outputs' common stem),
    ok, reason, lesions, burden (``Burden.to_json``, or None until predicted).
    A task with "seg" ("source" or "deidentified", the --seg-patient) also gets its DICOM SEG,
    built from the scan's source files; the flag travels in the task, so Ray's actors get it too.
    Plain Python: each Ray actor runs it on its batches, a single scan runs it in process."""
    rows, ready = [], []
    for task in tasks:
        row = {"file": task["files"][0], "output": storage.join(task["out_dir"], task["name"]),
               "ok": False, "reason": "", "lesions": 0, "burden": None}
        rows.append(row)
        try:
            scan, box = read_and_crop(task["files"], secret)
        except InputError as err:
            row.update(file=err.path, reason=err.reason)
            continue
        ready.append((task, row, scan, box))
    predictions = predict_scans(model, [r[2] for r in ready], boxes=[r[3] for r in ready], threshold=threshold)
    for (task, row, scan, _), prediction in zip(ready, predictions):
        prediction = dataclasses.replace(prediction, name=task["name"])
        seg = None
        if task.get("seg"):
            seg = functools.partial(_write_seg, scan.source_files, prediction.mask, task["seg"], secret)
        try:
            _write(task["out_dir"], prediction, reference_view(scan), seg)
        except OSError as err:  # a full disk or a name the filesystem refuses: this scan's outputs only
            row["reason"] = f"its outputs could not be written ({err.strerror or describe(err)})"
            continue
        except SegFailed as err:  # this scan's outputs only; the reason quotes no header value
            row.update(file=err.path or row["file"], reason=f"its DICOM SEG could not be written: {err.reason}")
            continue
        row.update(ok=True, lesions=prediction.lesions, burden=prediction.burden.to_json())
    return rows


def _write(out_dir: str, prediction, counts: np.ndarray, seg: Callable[[Path], object] | None = None) -> None:
    """``write_prediction`` into a local folder, or into object storage by way of a local one
    (skimage and matplotlib write files): from the process that predicted, on whatever node.
    seg: writes the scan's DICOM SEG to the path it is given (``_write_seg``), after the others.
    A local write that fails (a full disk, a SEG that cannot be built) removes what it had
    written of this scan's outputs: no half PNG is left to look like a result, and no mask
    without the SEG that was asked for."""

    def write_all(folder: str | Path) -> None:
        write_prediction(folder, prediction, counts)
        if seg is not None:
            seg(seg_file(folder, prediction.name))

    if not storage.is_uri(out_dir):
        try:
            write_all(out_dir)
        except (OSError, SegFailed):
            written = list(output_paths(out_dir, prediction.name).values())
            for path in written + ([seg_file(out_dir, prediction.name)] if seg is not None else []):
                path.unlink(missing_ok=True)
            raise
        return
    with tempfile.TemporaryDirectory(prefix="bonescan-predict-") as tmp:
        write_all(tmp)
        storage.upload(Path(tmp), out_dir)


# `--seg` without highdicom: one line saying what to install.
SEG_EXTRA = "it needs highdicom: pip install 'bonescan[seg]'"
SEG_PATIENTS = ("source", "deidentified")


def seg_file(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>.seg.dcm``, beside the scan's other outputs."""
    return Path(out_dir) / f"{name}.seg.dcm"


class SegFailed(Exception):
    """A scan's DICOM SEG could not be built: the source file at fault (or None) and why."""

    def __init__(self, path: str | None, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


def _write_seg(source_files: tuple[str, ...], mask: np.ndarray, patient: str, secret: bytes, path: Path) -> None:
    """The scan's DICOM SEG at ``path``, its source files read again with pydicom. A SEG that
    cannot be built is SegFailed (a failed write stays an OSError)."""
    try:
        from bonescan_model.io.seg import write_segmentation
    except ModuleNotFoundError as err:  # a node of the cluster without the extra
        if not _is_highdicom(err):
            raise
        raise SegFailed(None, SEG_EXTRA) from None
    try:
        write_segmentation(path, source_files, mask, patient=patient, secret=secret)
    except InputError as err:  # a source the SEG cannot reference
        raise SegFailed(err.path, err.reason) from None
    except ValueError as err:
        raise SegFailed(None, " ".join(str(err).split())) from None


def _require_seg() -> None:
    """InputError, before any work, when --seg cannot be served here (highdicom missing)."""
    try:
        import bonescan_model.io.seg  # noqa: F401
    except ModuleNotFoundError as err:
        if not _is_highdicom(err):
            raise
        raise InputError("--seg", f"writing DICOM SEG: {SEG_EXTRA}") from None


def _is_highdicom(err: ModuleNotFoundError) -> bool:
    return (err.name or "").split(".")[0] == "highdicom"


class _BatchPredictor:
    """The Ray Data actor: loads the checkpoint once, then predicts batch after batch.
    The checkpoint must be readable on every node: a URI (each actor fetches its own copy) or
    a run folder on shared storage, as multi-node training needs anyway."""

    def __init__(self, checkpoint: str, secret: bytes):
        with storage.local_checkpoint(checkpoint) as local:
            self.trained = load_model(local)
        self.secret = secret

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = predict_batch(self.trained.model, [json.loads(t) for t in batch["task"]], self.secret,
                             self.trained.threshold)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _run_on_ray(checkpoint: str, tasks: list[dict], secret: bytes) -> list[dict]:
    import ray

    with ray_session():
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, min(math.ceil(len(tasks) / BATCH_SCANS), cpus, MAX_ACTORS))
        # Spread small jobs over every actor instead of filling the first one's batch.
        batch_size = min(BATCH_SCANS, math.ceil(len(tasks) / actors))
        # Tasks travel as JSON strings: a list column would make Arrow infer a schema per block.
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks]).map_batches(
            _BatchPredictor,
            fn_constructor_kwargs={"checkpoint": str(checkpoint), "secret": secret},
            batch_size=batch_size, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
        )
        return [json.loads(r["row"]) for r in collect_rows(ds, total=len(tasks), desc="predict", unit="scan")]


def predict(checkpoint: str, dicom: str, out: str, seg: bool = False, seg_patient: str = "source") -> int:
    """Exit code 0 when at least one scan was predicted, 2 when none was.
    Raises InputError for a bad --checkpoint or a --dicom that does not exist. checkpoint and
    out: local or URIs (``storage``); dicom: files (pydicom reads files, as ingest does).
    seg: also write each scan's DICOM SEG, its patient module the source's or de-identified
    (seg_patient; ``bonescan_model.io.seg``); InputError at once when highdicom is missing."""
    if seg_patient not in SEG_PATIENTS:
        raise InputError("--seg-patient", f"{quoted(seg_patient)} is not one of {', '.join(SEG_PATIENTS)}")
    if seg:
        _require_seg()
    if storage.is_uri(dicom):
        raise InputError(dicom, "--dicom reads files the cluster's nodes can open (pydicom takes files): "
                                "copy the scans out of object storage first")
    checkpoint = storage.absolute(checkpoint)
    with storage.local_checkpoint(checkpoint) as local:
        trained = load_model(local)  # here, so a bad checkpoint fails at once
        checkpoint = checkpoint if storage.is_uri(checkpoint) else str(local)
    secret = load_or_create_secret(default_secret_path())
    out_dir = storage.absolute(out) if storage.is_uri(out) else out
    storage.check_writable(out_dir)
    tasks, unreadable = plan_scans(Path(dicom), out_dir, secret)
    if seg:
        tasks = [{**task, "seg": seg_patient} for task in tasks]
    if len(tasks) > 1:
        rows = _run_on_ray(checkpoint, tasks, secret)
    else:
        rows = predict_batch(trained.model, tasks, secret, trained.threshold)
    rejected = [{"file": e.path, "reason": e.reason} for e in unreadable]
    rejected += [{"file": r["file"], "reason": r["reason"]} for r in rows if not r["ok"]]
    predicted = [r for r in rows if r["ok"]]
    _print_summary(predicted, rejected, out_dir, seg)
    return 0 if predicted else 2


def _print_summary(predicted: list[dict], rejected: list[dict], out_dir: str, seg: bool = False) -> None:
    lesions = sum(r["lesions"] for r in predicted)
    print(f"predicted {len(predicted)} scan(s), {lesions} lesion(s) found; "
          f"rejected {len(rejected)} file(s)")
    scans = sorted(((shown(storage.relative(r["output"], out_dir)), r) for r in predicted), key=lambda s: s[0])
    width = max((len(name) for name, _ in scans), default=4)
    if scans:
        # skeleton %: lesion area over the skeleton's inside the crop box (bonescan_model.burden)
        print(f"  {'scan':<{width}} {'lesions':>7} {'area cm²':>9} {'skeleton %':>10}")
    for name, r in scans:
        burden = r["burden"]
        print(f"  {name:<{width}} {r['lesions']:>7} {burden['lesion_area_cm2']:>9.2f} "
              f"{100 * burden['skeleton_share']:>10.2f}")
    seg_output = ", <name>.seg.dcm" if seg else ""
    print(f"outputs: {out_dir}  (per scan: <name>.mask.png, <name>.json, <name>.overlay.png{seg_output})")
    if rejected:
        print("rejected:")
        for r in sorted(rejected, key=lambda r: r["file"]):
            print(f"  {shown(r['file'])}: {r['reason']}")


def collect_rows(ds, *, total: int, desc: str, unit: str, weight: Callable[[dict], int] = lambda row: 1) -> list[dict]:
    """Every row of ``ds`` (in no particular order), the bar advanced by ``weight(row)`` units.

    Ray Data's own progress bars are switched off for this dataset: they count blocks and
    operators, ours counts scans, and in a log (not a terminal) Ray Data would write its
    progress as log lines every few seconds."""
    ds.context.enable_progress_bars = False
    # ... which would then say so, once per process, with a hint to turn them back on.
    notices = logging.getLogger("ray.data._internal.progress")
    level = notices.level
    notices.setLevel(logging.ERROR)
    rows = []
    try:
        with progress(total=total, desc=desc, unit=unit) as bar:
            for row in ds.iter_rows():
                rows.append(row)
                bar.update(weight(row))
    finally:
        notices.setLevel(level)
    return rows
