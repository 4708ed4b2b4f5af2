"""A sweep's arms against its control: the rows ``runs.Experiment.write_comparisons`` keeps
(``EXP/comparisons.csv`` and ``.parquet``).

A space that names its control (``compare: {control: {...}, pair_by: seed}``,
``search_space``) gets one row per arm and value of the other swept parameters: each arm
trial is paired with the control trial of the same seed and the same other values, and the
pairs' test DSC (run 0, the kept model, scored once) go through ``bonescan_model.paired``,
whose docstring states the verdict rule. The bootstrap draws the trials' per-image test
scores (the test score's ``per_image``, in scan_key order, so image i is the same scan in
every trial of the experiment). Only finished trials count: an ASHA-stopped trial trained
less than its pair, so a pair with one is left out, and the row says how many were.
"""

from __future__ import annotations

import math

import numpy as np

from bonescan_model.paired import MARGIN, compare
from bonescan_platform.runs import Run
from bonescan_platform.search_space import SearchSpace

METRIC = "dsc"  # the headline the verdicts are about


def table(rows: list[dict], space: SearchSpace, runs: list[Run]) -> list[dict]:
    """The comparison rows of a sweep's results (``tune.collect``'s rows); [] without a control.
    runs: the trials' runs (each one's test score holds its per-image scores)."""
    by_trial = {run.name: run for run in runs}
    if space.compare is None:
        return []
    control = space.compare["control"]
    control_key = _key(control, control)
    others = [name for name in space.names if name not in control]
    usable = [r for r in rows if r["status"] == "finished" and _finite(r.get(METRIC))]
    controls = {(_key(r, others), r["seed"]): r for r in usable if _key(r, control) == control_key}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if _key(row, control) != control_key:
            groups.setdefault((_key(row, control), _key(row, others)), []).append(row)
    usable_ids = {r["trial_id"] for r in usable}
    out = []
    for (arm, rest), trials in sorted(groups.items(), key=lambda g: str(g[0])):
        pairs = [(t, controls[(rest, t["seed"])]) for t in sorted(trials, key=lambda t: t["seed"])
                 if t["trial_id"] in usable_ids and (rest, t["seed"]) in controls]
        images = [(per_image(by_trial[a["trial_id"]]), per_image(by_trial[c["trial_id"]])) for a, c in pairs]
        have_images = pairs and all(a is not None and c is not None and len(a) == len(c) for a, c in images)
        result = compare([a[METRIC] for a, _ in pairs], [c[METRIC] for _, c in pairs],
                         [a for a, _ in images] if have_images else None,
                         [c for _, c in images] if have_images else None)
        out.append({
            **dict(zip(control, arm)), **dict(zip(others, rest)),
            "arm": ", ".join(f"{k}={v}" for k, v in zip(control, arm)),
            "control": ", ".join(f"{k}={v}" for k, v in control.items()),
            "where": ", ".join(f"{k}={v}" for k, v in zip(others, rest)),
            "metric": f"test {METRIC}", "seeds": ", ".join(str(a["seed"]) for a, _ in pairs),
            "unpaired_trials": len(trials) - len(pairs), **result.to_dict(), "margin": MARGIN,
        })
    return out


def _key(row: dict, names) -> tuple:
    return tuple(str(row[name]) for name in names)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def per_image(run: Run) -> np.ndarray | None:
    """A run's run-0 test DSC per lesion-bearing image (the headline's images, in scan_key
    order), or None (no test score, or one without them: an nnU-Net baseline's)."""
    kept = (run.any_test_score or {}).get("per_image")
    if not kept:
        return None
    scores, lesions = np.asarray(kept[METRIC], float), np.asarray(kept["lesions"])
    return scores[lesions > 0]
