"""`bonescan evaluate`: a checkpoint scored on the test split of a shard folder.

The scores, the paper's runs and the burden are ``scoring``'s; this is the command around them.
"""

from __future__ import annotations

import json

from bonescan_model.checkpoint import load_model
from bonescan_model.errors import InputError
from bonescan_platform import scoring, shards, storage, stream


def evaluate(checkpoint: str, data: str, runs: int = 10, json_path: str | None = None) -> int:
    """`bonescan evaluate`: checkpoint, data and json_path local or URIs (``storage``)."""
    if runs < 1:
        raise InputError(checkpoint, "--runs must be at least 1")
    if json_path:
        storage.check_writable(json_path, file=True)  # before the scoring, not after it
    with storage.local_checkpoint(checkpoint) as local:
        trained = load_model(local)
    shards.verify(data)
    result = scoring.score_runs(trained.model, stream.crops(data, "test"), runs, trained.threshold)
    if not result["images"]:
        raise InputError(data, "the test split has no labeled scan to evaluate on")
    result = {"split": "test", **result, "checkpoint": storage.absolute(checkpoint),
              "epoch": trained.meta.get("epoch"), "threshold": trained.threshold}
    scoring.print_summary(result)
    if json_path:
        storage.write_text(json_path, json.dumps(result, indent=2))
        print(f"metrics: {json_path}")
    return 0


