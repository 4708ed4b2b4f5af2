"""The shard contract (docs/design.md): Parquet schema, row encoding, atomic writes, the manifest.

A shard folder is one Parquet dataset to any standard reader (pyarrow, pandas, DuckDB, Ray
Data): everything in it that is not a shard starts with ``_`` (the manifest, reports, the
DCGAN's run folder and sample sheet), which those readers skip like ``.`` names.

Images are stored as raw little-endian bytes in C order, not as Parquet lists: a 256x256
uint16 crop is one 128 KiB binary value that decodes with ``np.frombuffer`` and no copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bonescan_model.errors import InputError, quoted
from bonescan_model.preprocess import CROP_SIZE
from bonescan_platform import storage

MANIFEST = "_manifest.json"
SCHEMA = pa.schema(
    [
        pa.field("patient_key", pa.string(), nullable=False),
        pa.field("scan_key", pa.string(), nullable=False),
        pa.field("ant", pa.binary(), nullable=False),  # uint16 (256, 256), raw counts
        pa.field("post", pa.binary()),  # uint16 (256, 256), mirrored into ANT orientation; null: one-view scan
        pa.field("mask", pa.binary()),  # uint8 (256, 256) 0/1; null: unlabeled
        pa.field("crop_box", pa.list_(pa.int32(), 4), nullable=False),  # row0, col0, rows, cols
        pa.field("pixel_spacing_mm", pa.float32(), nullable=False),
        pa.field("readers_agree", pa.bool_()),  # null: no annotation at all
        pa.field("source", pa.string(), nullable=False),  # dicom | synthetic | augmented:<op> | dcgan
        pa.field("split", pa.string(), nullable=False),  # train | test, per patient
        pa.field("views", pa.string(), nullable=False),  # "ANT+POST" or the single view present
    ]
)


def encode_image(image: np.ndarray, dtype: str) -> bytes:
    """(256, 256) array -> little-endian C-order bytes of ``dtype`` ('<u2' or 'u1')."""
    if image.shape != (CROP_SIZE, CROP_SIZE):
        raise ValueError(f"expected a ({CROP_SIZE}, {CROP_SIZE}) image, got {image.shape}")
    return np.ascontiguousarray(image, dtype=dtype).tobytes()


def decode_image(data: bytes, dtype: str) -> np.ndarray:
    """Inverse of encode_image: a read-only (256, 256) view of ``data``."""
    return np.frombuffer(data, dtype=dtype).reshape(CROP_SIZE, CROP_SIZE)


SPLITS = ("train", "test")


def shard_row(*, patient_key: str, scan_key: str, ant: np.ndarray, post: np.ndarray | None,
              mask: np.ndarray | None, crop_box, pixel_spacing_mm: float, readers_agree: bool | None,
              source: str, split: str, views: str) -> dict:
    """One row of SCHEMA from its arrays: the one place a crop becomes a row (ingest, augment
    and the DCGAN samples all build theirs here). ant, post: (256, 256) raw counts, post
    mirrored into ANT orientation or None (one view); mask: (256, 256) 0/1 or None (unlabeled)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return {
        "patient_key": patient_key,
        "scan_key": scan_key,
        "ant": encode_image(ant, "<u2"),
        "post": None if post is None else encode_image(post, "<u2"),
        "mask": None if mask is None else encode_image(mask, "u1"),
        "crop_box": [int(v) for v in crop_box],
        "pixel_spacing_mm": float(pixel_spacing_mm),
        "readers_agree": readers_agree,
        "source": source,
        "split": split,
        "views": views,
    }


def row_images(row: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(ant, post, mask) of a SCHEMA row, decoded (None where the row has none)."""
    ant = decode_image(row["ant"], "<u2")
    post = None if row["post"] is None else decode_image(row["post"], "<u2")
    mask = None if row["mask"] is None else decode_image(row["mask"], "u1")
    return ant, post, mask


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    rows: int
    sha256: str


def write_shard(rows: list[dict], path: str | Path, *, by_content: bool = False) -> ShardInfo:
    """Write rows (schema above) to ``path`` (a local path or a URI: ``storage``) atomically.

    A reader never sees a half-written shard (``storage.write_bytes``). by_content: the file
    is named ``<stem>-<16 hex digits of its SHA-256>.parquet``, so a new set of shards never
    overwrites a file of the set it is to replace (the same rows give the same name, and the
    same bytes). The shard is serialized in memory first (its name needs its hash, and an
    object store cannot rename): a shard is tens of MiB at most (ingest.ROWS_PER_SHARD).
    """
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    digest = hashlib.sha256(data).hexdigest()
    folder, file = _split(str(path))
    if by_content:
        stem, dot, suffix = file.rpartition(".")
        file = f"{stem}-{digest[:16]}{dot}{suffix}"
    storage.write_bytes(storage.join(folder, file), data)
    split = rows[0]["split"] if rows else ""
    return ShardInfo(file=file, split=split, rows=len(rows), sha256=digest)


def _split(location: str) -> tuple[str, str]:
    folder, _, file = location.rstrip("/").rpartition("/")
    return folder, file


def write_manifest(out_dir: str | Path, shards: list[ShardInfo], report: dict) -> str:
    """The manifest, written last by every job: it names only shards already complete."""
    body = {
        "schema_version": 1,
        "shards": [s.__dict__ for s in sorted(shards, key=lambda s: s.file)],
        "rows": sum(s.rows for s in shards),
        "report": report,
    }
    target = storage.join(out_dir, MANIFEST)
    storage.write_text(target, json.dumps(body, indent=2, sort_keys=True))
    return target


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard folder, checked for the shape written above: an InputError
    naming the folder or the file for anything else (missing, not JSON, not a manifest)."""
    if storage.is_file(shard_dir):
        raise InputError(shard_dir, "is a file, not a shard folder (from `bonescan ingest`)")
    path = storage.join(shard_dir, MANIFEST)
    try:
        body = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise InputError(path, "no shard manifest here; run `bonescan ingest` first") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(path, f"not a readable shard manifest ({type(err).__name__}: {err})") from None
    listed = body.get("shards") if isinstance(body, dict) else None
    if not isinstance(listed, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
            and not s["file"].startswith(".") and isinstance(s.get("split"), str)
            and isinstance(s.get("rows"), int) for s in listed):
        raise InputError(path, "not a shard manifest: expected an object whose \"shards\" list holds "
                               "{file, split, rows} entries naming files in this folder")
    return body


def shard_paths(shard_dir: str | Path, split: str | None = None) -> list[str]:
    """The shard files the manifest lists (optionally one split), each checked to be the file
    the manifest recorded (``verify``): local paths, or URIs when the folder is one (Ray
    Data's ``read_parquet`` takes either)."""
    manifest = verify(shard_dir)
    return [storage.join(shard_dir, s["file"]) for s in manifest["shards"] if split is None or s["split"] == split]


# The folders this process has verified, with their manifest and each shard's size and time:
# a job asks for its shards several times, and a listed file is read again only if it changed.
_VERIFIED: set[tuple] = set()
# The bytes of one image value of each binary column (docs/design.md, "Shard schema").
_VALUE_BYTES = {"ant": 2 * CROP_SIZE * CROP_SIZE, "post": 2 * CROP_SIZE * CROP_SIZE, "mask": CROP_SIZE * CROP_SIZE}


def verify(shard_dir: str | Path) -> dict:
    """The manifest of a shard folder, once every shard it lists is checked to be what it
    recorded: present, of the manifest's SHA-256 (a file cut short or changed after it was
    written fails here, not as an Arrow traceback after Ray has started), a Parquet file of
    SCHEMA, with the listed rows of the listed split, and images of the crop's size. Any
    failure is an InputError naming the shard."""
    manifest = read_manifest(shard_dir)
    key = (str(shard_dir), json.dumps(manifest, sort_keys=True),
           tuple(storage.stamp(storage.join(shard_dir, s["file"])) for s in manifest["shards"]))
    if key in _VERIFIED:
        return manifest
    for entry in manifest["shards"]:
        path = storage.join(shard_dir, entry["file"])
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise InputError(path, f"listed in the shard manifest ({MANIFEST}) but missing") from None
        except OSError as err:
            raise InputError(path, f"cannot be read ({err.strerror or type(err).__name__})") from None
        expected = entry.get("sha256")
        if isinstance(expected, str) and hashlib.sha256(data).hexdigest() != expected:
            raise InputError(path, f"its content is not what the shard manifest ({MANIFEST}) recorded (SHA-256 "
                                   "differs): the file was cut short or changed after it was written; "
                                   "ingest again")
        _check_shard(path, data, entry)
    _VERIFIED.add(key)
    return manifest


def _check_shard(path: str, data: bytes, entry: dict) -> None:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(path, f"not a readable Parquet file ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]})") from None
    missing = [f.name for f in SCHEMA if f.name not in table.schema.names]
    wrong = [f"{f.name} is {table.schema.field(f.name).type}, expected {f.type}"
             for f in SCHEMA if f.name in table.schema.names and not table.schema.field(f.name).type.equals(f.type)]
    if missing or wrong:
        raise InputError(path, "not a bonescan shard: " + "; ".join(
            ([f"no column {', '.join(missing)}"] if missing else []) + wrong))
    if table.num_rows != entry["rows"]:
        raise InputError(path, f"holds {table.num_rows} rows, the shard manifest lists {entry['rows']}")
    if entry["split"] not in SPLITS:  # split names become parts of output file names
        raise InputError(path, f"the shard manifest lists it as split {quoted(entry['split'])}, not one of {SPLITS}")
    splits = set(table.column("split").to_pylist())
    if splits - {entry["split"]}:
        raise InputError(path, f"holds rows of split {', '.join(sorted(splits - {entry['split']}))}, the shard "
                               f"manifest lists it as {entry['split']}")
    for column, size in _VALUE_BYTES.items():
        lengths = pc.binary_length(table.column(column)).drop_null()
        bad = pc.not_equal(lengths, size)
        if len(lengths) and pc.any(bad).as_py():
            found = lengths.filter(bad)[0].as_py()
            raise InputError(path, f"its {column} column holds a {found}-byte image, expected {size} bytes "
                                   f"(a {CROP_SIZE}x{CROP_SIZE} crop): not a shard this bonescan wrote")


def read_table(paths: list[str], columns: list[str], where=None) -> pa.Table:
    """Shard files (``shard_paths``) read in this process, without Ray; ``where``: a pyarrow
    compute expression the rows must meet (applied as the files are read, so the rows left out
    are never held together)."""
    if not paths:
        return SCHEMA.empty_table().select(columns)
    fs, _ = storage.locate(paths[0])
    return pq.read_table([storage.locate(p)[1] for p in paths], columns=columns, filesystem=fs, filters=where)


def split_rows(shard_dir: Path, split: str) -> int:
    """Rows of ``split`` the manifest lists (its files checked to exist)."""
    shard_paths(shard_dir, split)
    return sum(s["rows"] for s in read_manifest(shard_dir)["shards"] if s["split"] == split)


def listed_files(shard_dir: Path) -> set[str] | None:
    """The shard file names a folder's manifest lists; None when it has no readable one
    (then no file there is known to be a shard)."""
    try:
        return {s["file"] for s in read_manifest(shard_dir)["shards"]}
    except InputError:
        return None


def retire(shard_dir: Path, previous: set[str] | None, current: list[ShardInfo]) -> None:
    """Delete the shards of the ``previous`` set that the ``current`` one (its manifest
    already written) does not list. Nothing else in the folder is touched."""
    keep = {s.file for s in current}
    for name in sorted((previous or set()) - keep):
        storage.delete(storage.join(shard_dir, name))
