"""`bonescan augment`: materialize geometric copies of a shard set (the paper's D2) with Ray Data,
and with ``--dcgan`` DCGAN samples (D3 from D1, D4 from D2; bonescan_platform.dcgan).

Every input row is kept unchanged and followed by K augmented copies. A copy keeps the
row's patient, split, crop box, spacing, readers' agreement and views, so the split stays
per patient; it gets its own ``scan_key`` and ``source = "augmented:<ops>"``. Unlabeled rows
stay unlabeled and one-view rows stay one-view.

Deterministic: a scan's copies are drawn from a generator seeded by (seed, scan_key), so
they depend neither on batch boundaries nor on which worker ran them, and no two copies of a
scan are equal; blocks are consumed in input order, so the shards are byte-identical from run
to run.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from bonescan_model import transforms as geometric
from bonescan_model.errors import InputError
from bonescan_platform import dcgan as dcgan_task
from bonescan_platform import shards, storage
from bonescan_platform.cluster import ray_session

# Output shards are cut at this many rows (about 80 MB of raw counts): the driver holds at most
# one open shard per split, however large K makes the output.
ROWS_PER_SHARD = 256
# Rows per map task: each expands to (K + 1) rows, about 0.3 MB each.
BATCH_ROWS = 8


def augment(
    data: str | Path,
    out: str | Path,
    copies: int | None = None,
    dcgan: bool = False,
    seed: int = 0,
    samples: int | None = None,
    gan: str | Path | None = None,
    gan_config: str | Path | None = None,
    workers: int = 1,
    gpus: bool = False,
    *,
    rows_per_shard: int = ROWS_PER_SHARD,
) -> int:
    """Write ``out``: the shards of ``data`` plus ``copies`` geometric copies of every row
    (default 1), and with ``dcgan`` ``samples`` DCGAN crops (copies then default to 0: D1 gives
    D3, D2 gives D4).

    The GAN is the trained one in ``gan`` (a GAN run folder or gan.pt), else one trained here
    on Ray Train (``gan_config`` YAML, ``workers``, ``gpus``) in ``out/_dcgan/``, resumed or
    reused by a rerun; ``out/_samples.png`` shows real crops beside generated ones.

    Returns 0. Raises InputError for bad input: no manifest, a listed shard missing,
    copies or seed < 0, ``out`` equal to ``data``, or ``out`` a non-empty folder that is not
    a shard folder (the shards its manifest lists are replaced, so it must be ours); DCGAN options without
    ``dcgan``, no ``samples`` with it, a bad GAN config or checkpoint.
    """
    if dcgan and (storage.is_uri(data) or storage.is_uri(out)):
        raise InputError(out if storage.is_uri(out) else data,
                         "--dcgan reads and writes local shard folders (its GAN run lives in the output folder): "
                         "geometric copies take object storage, DCGAN samples not yet")
    data, out = storage.absolute(data), storage.absolute(out)
    if copies is None:
        copies = 0 if dcgan else 1
    if not dcgan and (samples is not None or gan is not None or gan_config is not None or workers != 1 or gpus):
        raise InputError(data, "--samples, --gan, --gan-config, --workers and --gpus go with --dcgan")
    if dcgan:
        if samples is None or samples < 1:
            raise InputError(data, f"--dcgan needs --samples N >= 1 (crops to generate), got {samples}")
        if gan is not None and gan_config is not None:
            raise InputError(gan_config, "--gan-config trains a GAN; --gan uses a trained one: give one of them")
        if workers < 1:
            raise InputError(data, f"--workers must be at least 1, got {workers}")
    # Fail before Ray starts, naming the file.
    gan_path = dcgan_task.resolve_gan(gan) if dcgan and gan is not None else None
    gan_cfg = dcgan_task.load_gan_config(gan_config) if dcgan and gan is None else None
    if copies < 0:
        raise InputError(data, f"--copies must be >= 0, got {copies}")
    if seed < 0:
        raise InputError(data, f"--seed must be >= 0, got {seed}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if out == data:
        raise InputError(out, "--out must differ from --data: the input shards would be overwritten")
    manifest = shards.read_manifest(data)
    paths = shards.shard_paths(data)
    storage.check_writable(out)
    if not paths:
        raise InputError(storage.join(data, shards.MANIFEST), "the manifest lists no shards")
    # A GAN run folder alone is ours too: a first --dcgan run stopped before its manifest.
    if (any(name != dcgan_task.RUN_DIR for name in storage.listdir(out))
            and not storage.is_file(storage.join(out, shards.MANIFEST))):
        raise InputError(out, "not empty and not a shard folder (no manifest); refusing to write there")
    spacing = dcgan_task.median_spacing(data) if dcgan else None
    previous = shards.listed_files(out)
    storage.makedirs(out)

    with ray_session():
        if dcgan and gan_path is None:
            gan_path = dcgan_task.train_gan(data, Path(out) / dcgan_task.RUN_DIR, gan_cfg, workers, gpus)
        ds = ray.data.read_parquet(paths)
        # The dataset's own copy of the DataContext: consume blocks in input order, so the
        # shards' row order, and hence their bytes, are the same on every run.
        ds.context.execution_options.preserve_order = True
        ds = ds.map_batches(
            _expand_batch,
            batch_format="pyarrow",
            batch_size=BATCH_ROWS,
            fn_kwargs={"copies": copies, "seed": seed},
            num_cpus=1,
        )
        tables = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        if dcgan:  # after every input row: the originals' shards keep their rows and order
            tables = itertools.chain(tables, dcgan_task.generated_tables(gan_path, samples, seed, spacing))
        written, sources = _write_shards(tables, out, rows_per_shard)

    report = {
        "job": "augment",
        "rows_in": int(manifest["rows"]),
        "rows_out": sum(s.rows for s in written),
        "copies": copies,
        "seed": seed,
        "sources": dict(sorted(sources.items())),
    }
    if dcgan:
        report["dcgan"] = {"samples": samples, "gan": str(gan_path.resolve()), "sheet": dcgan_task.SHEET,
                           **dcgan_task.gan_summary(gan_path)}
        dcgan_task.write_sheet(Path(data), Path(out), gan_path, seed)
    shards.write_manifest(out, written, report)
    # After the manifest: a rerun with fewer rows or copies must not leave old shards behind;
    # only the shards the previous manifest listed are retired, nothing else in the folder.
    shards.retire(out, previous, written)
    generated = f", {samples} DCGAN samples (sheet: {storage.join(out, dcgan_task.SHEET)})" if dcgan else ""
    print(f"augment: {report['rows_in']} rows in, {report['rows_out']} rows out ({copies} copies{generated}, "
          f"seed {seed}) -> {out}")
    return 0


def augmented_scan_key(scan_key: str, seed: int, copy: int) -> str:
    """The scan_key of copy ``copy`` (1..K) of a scan: 64 hex characters.

    A plain SHA-256 is enough: scan_key is already a keyed hash, nothing identifying is left
    to protect. The seed is part of it because another seed gives another image.
    """
    return hashlib.sha256(f"{scan_key}|augmented|{seed}|{copy}".encode()).hexdigest()


def copy_transforms(scan_key: str, seed: int, copies: int) -> list[geometric.Transform]:
    """The transforms of a scan's copies 1..K: distinct, and a function of (scan_key, seed)
    alone, so neither batch boundaries nor the worker that runs them change the output."""
    digest = hashlib.sha256(f"{scan_key}|augment|{seed}".encode()).hexdigest()
    return geometric.distinct_transforms(np.random.default_rng(int(digest, 16)), copies)


def _expand_batch(batch: pa.Table, copies: int, seed: int) -> pa.Table:
    """Each row, then its ``copies`` augmented copies (rows in the shard schema)."""
    rows = []
    for row in batch.to_pylist():
        rows.append(row)
        for copy, transform in enumerate(copy_transforms(row["scan_key"], seed, copies), start=1):
            rows.append(_augmented_row(row, transform, augmented_scan_key(row["scan_key"], seed, copy)))
    return pa.Table.from_pylist(rows, schema=shards.SCHEMA)


def _augmented_row(row: dict, transform: geometric.Transform, scan_key: str) -> dict:
    ant, post, mask = shards.row_images(row)
    views = ant if post is None else np.stack([ant, post])  # (H, W) or (2, H, W)
    views, mask = geometric.apply(transform, views, mask)
    kept = {k: row[k] for k in ("patient_key", "crop_box", "pixel_spacing_mm", "readers_agree", "split", "views")}
    return shards.shard_row(**kept, scan_key=scan_key, source=f"augmented:{transform.name}",
                            ant=views if post is None else views[0], post=None if post is None else views[1],
                            mask=mask)


def _write_shards(batches, out: str, rows_per_shard: int) -> tuple[list[shards.ShardInfo], collections.Counter]:
    """Stream rows into ``<split>-NNNNN.parquet`` shards of at most ``rows_per_shard`` rows."""
    open_rows: dict[str, list[dict]] = {}
    next_index: collections.Counter = collections.Counter()
    sources: collections.Counter = collections.Counter()
    written: list[shards.ShardInfo] = []

    def close(split: str) -> None:
        name = f"{split}-{next_index[split]:05d}.parquet"
        next_index[split] += 1
        written.append(shards.write_shard(open_rows.pop(split), storage.join(out, name)))

    for table in batches:
        for row in table.to_pylist():
            split = row["split"]
            sources[row["source"]] += 1
            open_rows.setdefault(split, []).append(row)
            if len(open_rows[split]) >= rows_per_shard:
                close(split)
    for split in sorted(open_rows):
        close(split)
    return written, sources
