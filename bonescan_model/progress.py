"""Progress of long work: a tqdm bar on a terminal, and nothing at all where stderr is not one
(a log file, CI, a pipe, a Ray worker), so that captured output holds results, not redraws."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str) -> tqdm:
    """A bar over ``iterable`` (or updated by hand up to ``total``) on stderr.

    disable=None is tqdm's "off unless the file is a terminal"."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)
