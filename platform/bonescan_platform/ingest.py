"""`bonescan ingest`: DICOM + LabelMe -> de-identified Parquet shards, in parallel Ray tasks.

The driver reads headers only (to group files per series, match each label to its one scan
(``label_match``) and assign each patient to train or test); Ray tasks then read, crop and
label the scans in parallel, one task per output shard, each writing its shard atomically, to
a local folder or straight to object storage (``storage``). The report and the
manifest come last, so a shard directory with a manifest is always complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from bonescan_model.cases import prepare_case
from bonescan_model.errors import InputError, describe, shown
from bonescan_model.io.deid import default_secret_path, keyed_hash, load_or_create_secret
from bonescan_model.io.dicom import group_series, scan_path
from bonescan_model.io.files import find_files
from bonescan_platform import shards, storage
from bonescan_platform.label_match import Scan, match_labels
from bonescan_platform.cluster import ray_session
from bonescan_model.progress import progress

TEST_FRACTION = 0.3
ROWS_PER_SHARD = 32
REPORT = "_ingest_report.json"  # "_": Parquet readers of the folder skip it (shards.py)


def assign_splits(patient_keys: set[str], secret: bytes, test_fraction: float = TEST_FRACTION) -> dict[str, str]:
    """Patient-level train/test split: patients ordered by a keyed hash (a seeded shuffle that
    does not depend on the order files were found in), the first 70 % train. Every scan of a
    patient gets the patient's split, so no patient is ever on both sides."""
    ordered = sorted(patient_keys, key=lambda k: keyed_hash(secret, "split", k))
    n_test = int(round(len(ordered) * test_fraction)) if len(ordered) > 1 else 0
    return {k: ("test" if i < n_test else "train") for i, k in enumerate(ordered)}


@dataclass(frozen=True)
class IngestPlan:
    """What the driver decides from headers alone: one task per output shard."""

    tasks: list[dict]
    unreadable: list[InputError]  # files that are not used, and why: not DICOM, hidden, copies, ...
    label_errors: list[InputError]  # label files that label no scan (no match, or several)


def plan_ingest(dicom_dir: Path, labels: Path | None, secret: bytes,
                rows_per_shard: int = ROWS_PER_SHARD) -> IngestPlan:
    files, skipped = find_files(dicom_dir)
    groups, unreadable = group_series(files, secret)
    splits = assign_splits({g.patient_key for g in groups if g.patient_key}, secret)
    root = dicom_dir if dicom_dir.is_dir() else dicom_dir.parent
    named = [Scan(scan_path(list(g.files), root), g.files) for g in groups]
    matched, label_errors = match_labels(labels, named)
    specs: dict[str, list[dict]] = {}
    for i, group in enumerate(groups):
        split = splits.get(group.patient_key, "train")  # no PatientID: read_scan rejects it
        specs.setdefault(split, []).append(
            {"files": [str(f) for f in group.files], "labels": [str(p) for p in matched.get(i, [])]})
    tasks = [
        {"shard": f"{split}-{i // rows_per_shard:05d}.parquet", "split": split,
         "scans": json.dumps(scans[i:i + rows_per_shard])}
        for split, scans in sorted(specs.items())
        for i in range(0, len(scans), rows_per_shard)
    ]
    return IngestPlan(tasks, skipped + unreadable, label_errors)


def ingest(dicom: str, out: str, labels: str | None = None, *, rows_per_shard: int = ROWS_PER_SHARD) -> int:
    """Exit code 0 when at least one scan was ingested, 2 when none was.

    The new shards get names of their own (``shards.write_shard(by_content=True)``), so the
    set already in ``out`` stays whole while they are written; the new manifest then replaces
    the old one, and only after that are the old set's shards the new one does not list
    deleted. No other file in ``out`` is touched, and an ingest that ingested nothing leaves
    the folder as it was."""
    for flag, folder in (("--dicom", dicom), ("--labels", labels)):
        if folder and storage.is_uri(folder):
            raise InputError(folder, f"{flag} reads files the cluster's nodes can open (pydicom and the "
                                     "LabelMe reader take files): copy the export out of object storage first")
    out_dir = storage.absolute(out)
    if storage.is_file(out_dir):
        raise InputError(out_dir, "is a file, not a folder for shards")
    storage.check_writable(out_dir)
    secret = load_or_create_secret(default_secret_path())
    plan = plan_ingest(Path(dicom), Path(labels) if labels else None, secret, rows_per_shard)
    previous = shards.listed_files(out_dir)
    storage.makedirs(out_dir)
    results = _run_tasks(plan.tasks, out_dir, secret) if plan.tasks else []
    written = [shards.ShardInfo(**r["shard"]) for r in results if r["shard"]]
    try:
        for result in results:  # a shard that could not be written (a full disk) fails the ingest
            if result.get("error"):
                raise InputError(result["error"]["file"], result["error"]["reason"])
        report = _report(results, plan)
        _print_report(report, out_dir)
        if not report["scans_ingested"] and previous is not None:
            print(f"nothing ingested: the shards in {shown(out_dir)} are left as they were")
            return 2
        storage.write_text(storage.join(out_dir, REPORT), json.dumps(report, indent=2, sort_keys=True))
        shards.write_manifest(out_dir, written, report)
    except InputError:
        _discard(out_dir, written, previous)  # no shard of this ingest is left unlisted
        raise
    shards.retire(out_dir, previous, written)
    return 0 if report["scans_ingested"] else 2


def _discard(out_dir: str, written: list[shards.ShardInfo], previous: set[str] | None) -> None:
    """Delete the shards this ingest wrote that the folder's manifest does not list: a failed
    ingest leaves no orphan (a later one retires only what a manifest listed, so an unlisted
    shard would stay for ever). A shard the previous set also lists (same content, same name)
    is that set's, and stays."""
    for info in written:
        if info.file not in (previous or set()):
            storage.delete(storage.join(out_dir, info.file))


def _run_tasks(tasks: list[dict], out_dir: str, secret: bytes) -> list[dict]:
    """Each shard's task as a plain Ray task, the results gathered as they finish.

    Plain tasks, not Ray Data: the work is a few dozen independent shard-sized calls with no
    stream between them, and Ray Data's planning, operator start-up and row serialization cost
    more than they buy here (bench/ingest.py measured a map_batches pipeline at 0.68x a
    single-process loop on 2 cores, against these tasks in bench/RESULTS.md). A task that dies
    with its worker is retried; its shard is written atomically under a name of its content, so
    a retry cannot leave a half shard."""
    import ray

    with ray_session():
        task = ray.remote(num_cpus=1, max_retries=2)(write_shard_task)
        pending = [task.remote(t, out_dir, secret) for t in tasks]
        results = []
        with progress(total=sum(len(json.loads(t["scans"])) for t in tasks), desc="ingest", unit="scan") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                result = ray.get(done[0])
                results.append(result)
                bar.update(len(result["scans"]))
        return results


def write_shard_task(task: dict, out_dir: str | Path, secret: bytes) -> dict:
    """Read, crop and label the scans of one shard, write the shard, report each scan.
    Plain Python: Ray tasks run it in parallel, the benchmark's baseline in a loop."""
    rows, outcomes = [], []
    for scan in json.loads(task["scans"]):
        try:
            case = prepare_case(scan["files"], scan["labels"], secret)
        except InputError as err:
            outcomes.append({"file": err.path, "ok": False, "reason": err.reason})
            continue
        except Exception as err:  # noqa: BLE001 - one bad scan must not lose the others
            outcomes.append({"file": scan["files"][0], "ok": False,
                             "reason": f"could not be read ({describe(err, redact=True)})"})
            continue
        rows.append(_row(case, task["split"]))
        outcomes.append({
            "file": scan["files"][0], "files": scan["files"], "ok": True, "views": "+".join(case.views),
            "labeled": case.mask is not None, "readers_agree": case.readers_agree,
            "patient": case.patient_key, "split": task["split"],
            "label_errors": [{"file": e.path, "reason": e.reason} for e in case.label_errors],
        })
    try:
        info = shards.write_shard(rows, storage.join(out_dir, task["shard"]), by_content=True).__dict__ if rows else None
    except InputError as err:  # the driver fails the ingest, naming the file, and removes this ingest's shards
        return {"shard": None, "scans": outcomes, "error": {"file": err.path, "reason": err.reason}}
    return {"shard": info, "scans": outcomes}


def _row(case, split: str) -> dict:
    return shards.shard_row(
        patient_key=case.patient_key, scan_key=case.scan_key, ant=case.ant, post=case.post, mask=case.mask,
        crop_box=case.crop_box, pixel_spacing_mm=case.pixel_spacing_mm, readers_agree=case.readers_agree,
        source="dicom", split=split, views="+".join(case.views))


def _report(results: list[dict], plan: IngestPlan) -> dict:
    # Every file name as errors.shown gives it: the report is JSON any tool reads as UTF-8, and
    # each of its lines is printed as one line.
    outcomes = [{**o, "file": shown(o["file"]), **({"files": [shown(f) for f in o["files"]]} if "files" in o else {})}
                for r in results for o in r["scans"]]
    ok = [o for o in outcomes if o["ok"]]
    rejected = [{"file": e.path, "reason": e.reason} for e in plan.unreadable]
    rejected += [{"file": o["file"], "reason": o["reason"]} for o in outcomes if not o["ok"]]
    splits = {}
    for split in ("train", "test"):
        mine = [o for o in ok if o["split"] == split]
        splits[split] = {
            "scans": len(mine),
            "patients": len({o["patient"] for o in mine}),
            "labeled": sum(o["labeled"] for o in mine),
            "flagged_for_reannotation": sum(o["readers_agree"] is False for o in mine),
            "one_view": sum("+" not in o["views"] for o in mine),
        }
    label_errors = [e for o in ok for e in o["label_errors"]]
    label_errors += [{"file": e.path, "reason": e.reason} for e in plan.label_errors]
    return {
        "scans_ingested": len(ok),
        "scans_rejected": len(rejected),
        "splits": splits,
        "scans": sorted(({k: o[k] for k in ("file", "files", "split", "views", "labeled", "readers_agree")}
                         for o in ok), key=lambda r: r["file"]),
        "rejected": sorted(rejected, key=lambda r: r["file"]),
        "label_errors": sorted(label_errors, key=lambda r: r["file"]),
    }


def _print_report(report: dict, out_dir: str) -> None:
    print(f"ingested {report['scans_ingested']} scan(s), rejected {report['scans_rejected']}")
    print(f"{'split':<6} {'scans':>6} {'patients':>9} {'labeled':>8} {'flagged':>8} {'one-view':>9}")
    for split, s in report["splits"].items():
        print(f"{split:<6} {s['scans']:>6} {s['patients']:>9} {s['labeled']:>8} "
              f"{s['flagged_for_reannotation']:>8} {s['one_view']:>9}")
    for kind in ("rejected", "label_errors"):
        if report[kind]:
            print(f"{kind.replace('_', ' ')}:")
            for r in report[kind]:
                print(f"  {shown(r['file'])}: {r['reason']}")
    if report["scans_ingested"]:
        print(f"shards: {out_dir}  (manifest {shards.MANIFEST}, report {REPORT})")
