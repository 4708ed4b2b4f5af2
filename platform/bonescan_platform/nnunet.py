"""`bonescan nnunet`: the real nnU-Net v2 as a supervised baseline, into a new run folder.

What it trains and how it is scored is ``nnunet_baseline``'s; this is the command around it.
The run folder is built in a stage beside RUN and moved into place when complete, so a failed
or stopped job leaves no half-written RUN.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bonescan_model.errors import InputError
from bonescan_model.train_config import NnunetConfig
from bonescan_platform import nnunet_baseline, shards, storage
from bonescan_platform.runs import TEST, Run, RunRecord


def nnunet(data: str, out: str, *, label_fraction: float | None = None, labeled_scans: int | None = None,
           epochs: int = 50, iterations: int = 250, views: str = "both", gpus: bool = False, seed: int = 0) -> int:
    """`bonescan nnunet`: train nnU-Net on the label budget's scans of ``data`` and score it on
    the test split, into the new run folder ``out``."""
    nnunet_baseline.check_installed()
    run = Path(out).resolve()
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise InputError(run, "exists and is not an empty folder: give a new folder for the nnU-Net run")
    if views not in nnunet_baseline.VIEWS:
        raise InputError(out, f"--views must be one of {', '.join(nnunet_baseline.VIEWS)}, got {views!r}")
    try:
        cfg = NnunetConfig(epochs=epochs, iterations=iterations, views=views, seed=seed, labeled_scans=labeled_scans,
                           label_fraction=1.0 if label_fraction is None else label_fraction)
    except ValueError as err:
        raise InputError(out, str(err)) from None
    shards.verify(data)
    run.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{run.name}.partial-", dir=run.parent))
    try:
        record = RunRecord(data=storage.absolute(data), gpus=gpus, trainer="nnunet")
        tested = nnunet_baseline.train_and_score(Run.create(stage, cfg, record), gpus)
        if run.exists():
            run.rmdir()  # empty: checked above
        os.replace(stage, run)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"nnU-Net: {epochs} epochs of {iterations} iterations on {tested['labeled_scans']} labeled scans; "
          f"kept by validation (DSC {tested['val_dsc']:.3f}); test split DSC {tested['dsc']:.3f} (CPA "
          f"{tested['cpa']:.3f}, recall {tested['recall']:.3f}) on {tested['images']} scans; run: {run}, "
          f"test: {run / TEST}")
    return 0


