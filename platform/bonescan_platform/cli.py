"""The `bonescan` command: one subcommand per job, each calling one function.

Arguments are parsed here and nowhere else; the job functions take plain values.
Exit codes: 0 success, 2 bad input or a job that is not available yet, 1 a failure.
"""

from __future__ import annotations

import argparse
import errno
import sys

from bonescan_model.errors import InputError


def _synth(patients: int, out: str, seed: int) -> int:
    from bonescan_model.synth import write_cohort

    if patients < 1:
        raise InputError(out, "--patients must be at least 1")
    summary = write_cohort(out, patients, seed)
    print(f"wrote {summary.patients} synthetic patients ({summary.lesions} lesions, "
          f"{len(summary.disagreeing_scans)} scans with a disagreeing reader) to {out}: "
          f"dicom/, labels/reader1..3/, truth/")
    return 0


def _ingest(dicom: str, labels: str | None, out: str) -> int:
    from bonescan_platform.ingest import ingest

    return ingest(dicom, out, labels)


def _train(data, config, out, workers: int, gpus: bool, resume: str | None, mlflow: str | None) -> int:
    from bonescan_platform import train

    if resume:
        if mlflow:
            raise InputError("--mlflow", "a resumed run logs to the MLflow run it started with (its record)")
        return train.resume(resume)
    missing = [flag for flag, value in (("--data", data), ("--config", config), ("--out", out)) if not value]
    if missing:
        raise InputError("bonescan train", f"{', '.join(missing)} required (or --resume RUN)")
    return train.train(data, config, out, workers, gpus, mlflow)


def _evaluate(checkpoint: str, data: str, runs: int, json_path: str | None) -> int:
    from bonescan_platform.evaluate import evaluate

    return evaluate(checkpoint, data, runs, json_path)


def _tune(data: str, space: str, out: str, resume: bool, mlflow: str | None) -> int:
    from bonescan_platform.tune import sweep

    if resume and mlflow:
        raise InputError("--mlflow", "a resumed sweep logs to the MLflow run it started with (its record)")
    return sweep(data, space, out, resume, mlflow)


def _report(experiment: str, out: str) -> int:
    from bonescan_platform.report import report

    return report(experiment, out)


def _predict(checkpoint: str, dicom: str, out: str, seg: bool, seg_patient: str | None) -> int:
    from bonescan_platform.predict import predict

    if seg_patient is not None and not seg:
        raise InputError("--seg-patient", "applies to the DICOM SEG only: add --seg")
    return predict(checkpoint, dicom, out, seg, seg_patient or "source")


def _serve(**kwargs) -> int:
    from bonescan_platform.serve import serve

    return serve(**kwargs)


def _nnunet(**kwargs) -> int:
    from bonescan_platform.nnunet import nnunet

    return nnunet(**kwargs)


def _export(checkpoint: str, fmt: str, out: str) -> int:
    import tempfile
    from pathlib import Path

    from bonescan_model.export import export
    from bonescan_platform import storage

    with storage.local_checkpoint(checkpoint) as local:
        if not storage.is_uri(out):
            terms = export(local, fmt, out)
        else:  # the exporters write files: export here, then send the file
            with tempfile.TemporaryDirectory(prefix="bonescan-export-") as tmp:
                terms = export(local, fmt, Path(tmp, storage.name(out)))
                storage.write_bytes(out, Path(tmp, storage.name(out)).read_bytes())
    print(f"exported {checkpoint} as {fmt} to {out}: input {terms['input_name']} ({terms['input_shape']}, "
          f"per-image normalized counts), output {terms['output_name']} ({terms['output_shape']}), "
          f"threshold {terms['threshold']}; the contract is in the file's metadata")
    return 0


def _demo(out: str, patients: int | None, config: str | None) -> int:
    from bonescan_platform.demo import demo

    return demo(out, patients, config)


MLFLOW_HELP = ("MLflow tracking URI (default $MLFLOW_TRACKING_URI; none: no tracking): config, epochs, "
               "test scores and model logged, the model registered as bonescan-<out folder name>")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bonescan",
        description="Semi-supervised segmentation of bone-metastasis lesions in whole-body bone scans, on Ray.",
    )
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")

    p = sub.add_parser("synth", help="write a synthetic cohort: DICOM + LabelMe + exact masks")
    p.add_argument("--patients", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = sub.add_parser("ingest", help="DICOM + LabelMe -> de-identified Parquet shards (Ray tasks)")
    p.add_argument("--dicom", required=True)
    p.add_argument("--labels")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_ingest)

    p = sub.add_parser("augment", help="materialize geometric (D2) or DCGAN (D3, D4) shards")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--copies", type=int, help="geometric copies of every row (default 1; 0 with --dcgan)")
    p.add_argument("--dcgan", action="store_true",
                   help="add DCGAN samples: D1 shards give D3, D2 shards give D4 (trains the GAN on Ray Train)")
    p.add_argument("--samples", type=int, metavar="N", help="with --dcgan: generated crops to add")
    p.add_argument("--gan", metavar="RUN", help="with --dcgan: use this trained GAN (a GAN run folder or gan.pt)")
    p.add_argument("--gan-config", metavar="YAML", help="with --dcgan: GAN settings (GanConfig keys)")
    p.add_argument("--workers", type=int, default=1, help="with --dcgan: GAN training workers")
    p.add_argument("--gpus", action="store_true", help="with --dcgan: train the GAN on GPUs")
    p.add_argument("--seed", type=int, default=0)

    def run_augment(**kwargs) -> int:
        # Imported when the job runs: Ray Data takes over a second to import, which every
        # other `bonescan` call (and --help) would otherwise pay.
        from bonescan_platform.augment import augment

        return augment(**kwargs)

    p.set_defaults(run=run_augment)

    p = sub.add_parser("train", help="train on Ray Train (DDP, CPU or GPU)")
    p.add_argument("--data", help="shard folder (from bonescan ingest)")
    p.add_argument("--config", help="training config YAML, e.g. configs/demo.yaml")
    p.add_argument("--out", help="run folder")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpus", action="store_true")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run from its latest checkpoint")
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.set_defaults(run=_train)

    p = sub.add_parser("tune", help="a Ray Tune sweep from tune_spaces/*.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--space", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    p.add_argument("--mlflow", metavar="URI", help=MLFLOW_HELP)
    p.set_defaults(run=_tune)

    p = sub.add_parser("evaluate", help="DSC / CPA / Recall on the test split, averaged over runs")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json", dest="json_path", metavar="FILE")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("predict", help="whole-body DICOM -> lesion mask, LabelMe contours, overlay")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dicom", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seg", action="store_true",
                   help="also write <name>.seg.dcm, a DICOM Segmentation of the source (needs 'bonescan[seg]')")
    p.add_argument("--seg-patient", choices=["source", "deidentified"], default=None,
                   help="the SEG's patient and study: the source's, for its PACS (default), or de-identified")
    p.set_defaults(run=_predict)

    p = sub.add_parser("nnunet", help="nnU-Net v2 as a baseline: trained on the label budget, scored on the test split")
    p.add_argument("--data", required=True, help="shard folder (from bonescan ingest)")
    p.add_argument("--out", required=True, help="a new run folder")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--label-fraction", type=float, default=None,
                        help="share of the original training scans labeled (default: all of them)")
    budget.add_argument("--labeled-scans", type=int, default=None, help="a count of labeled scans instead")
    p.add_argument("--epochs", type=int, default=50, help="nnU-Net epochs (its own default is 1000)")
    p.add_argument("--iterations", type=int, default=250, help="iterations per epoch (nnU-Net's default 250)")
    p.add_argument("--views", choices=["both", "aggregated"], default="both",
                   help="ANT and mirrored POST as two channels, or their sum (the paper's D2_Agg)")
    p.add_argument("--seed", type=int, default=0, help="draws the labeled patients, as a training seed does")
    p.add_argument("--gpus", action="store_true", help="train on one GPU")
    p.set_defaults(run=_nnunet)

    p = sub.add_parser("serve", help="the kept model as an HTTP service on Ray Serve: POST /segment, GET /healthz")
    p.add_argument("--checkpoint", required=True, help="a run folder or a model.pt (local or a URI)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="copies of the model, one CPU (or GPU) each")
    p.add_argument("--gpus", action="store_true", help="one GPU per replica")
    p.add_argument("--max-body-mb", type=int, default=32, help="larger request bodies get 413 (default 32)")
    p.add_argument("--ready-file", help="written (JSON: url, run) once the service answers")
    p.set_defaults(run=_serve)

    p = sub.add_parser("report", help="an HTML report of an experiment or a run")
    p.add_argument("--experiment", required=True, help="an experiment folder (bonescan tune) or a run folder")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_report)

    p = sub.add_parser("export", help="a checkpoint as ONNX or TorchScript, its input contract in the file")
    p.add_argument("--checkpoint", required=True, help="a run folder or a model.pt")
    p.add_argument("--format", dest="fmt", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="the file to write")
    p.set_defaults(run=_export)

    p = sub.add_parser("demo", help="synth -> ingest -> train -> evaluate -> predict -> report")
    p.add_argument("--out", default="bonescan-demo")
    p.add_argument("--patients", type=int, default=None, help="synthetic patients (default 40)")
    p.add_argument("--config", default=None, help="training config YAML (default configs/demo.yaml)")
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A file name that is not UTF-8 reaches a report as lone surrogates, which a strict UTF-8
    # stream refuses: print them escaped instead of dying after the work is done. (Names in
    # bonescan's own messages go through errors.shown; this covers every other print.)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = vars(_build_parser().parse_args(argv))
    run = args.pop("run")
    args.pop("job")
    try:
        return int(run(**args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # An output that could not be written where no job foresaw it (a disk that filled
        # between two files): the file and the reason, in one line, as for bad input.
        if err.errno not in _UNWRITABLE:
            raise
        print(f"error: {InputError(err.filename or '<output>', f'cannot be written ({err.strerror})')}", file=sys.stderr)
        return 2


_UNWRITABLE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


if __name__ == "__main__":
    sys.exit(main())
