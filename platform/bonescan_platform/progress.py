"""A Ray Data job's output rows, collected under one bonescan_model.progress bar."""

from __future__ import annotations

import logging
from collections.abc import Callable

from bonescan_model.progress import progress


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
