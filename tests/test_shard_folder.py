"""A shard folder is one Parquet dataset to the standard readers: pyarrow, pandas, DuckDB and
Ray Data read the folder `bonescan ingest` wrote, as it is, with no file list.

Every test here uses the folder the real ingest wrote, and ingest runs on Ray: the module is
marked ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from bonescan_model.synth import write_cohort
from bonescan_platform import shards
from bonescan_platform.cli import main
from bonescan_platform.ingest import REPORT

pytestmark = pytest.mark.ray
PATIENTS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ray_local, deid_secret):
    root = tmp_path_factory.mktemp("shard_folder")
    write_cohort(root / "cohort", PATIENTS, seed=3)
    out = root / "shards"
    assert main(["ingest", "--dicom", str(root / "cohort" / "dicom"), "--labels", str(root / "cohort" / "labels"),
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def expected(folder):
    """The scan keys of the shards the manifest lists, read one file at a time."""
    keys = [k for path in shards.shard_paths(folder) for k in pq.read_table(path).column("scan_key").to_pylist()]
    assert len(keys) == PATIENTS
    return sorted(keys)


def test_everything_beside_the_shards_starts_with_an_underscore(folder):
    names = sorted(p.name for p in folder.iterdir())
    assert shards.MANIFEST in names and REPORT in names
    assert [n for n in names if not n.endswith(".parquet") and not n.startswith("_")] == []


def test_pyarrow_reads_the_folder(folder, expected):
    table = pq.read_table(folder)
    assert table.schema.equals(shards.SCHEMA, check_metadata=False)
    assert sorted(table.column("scan_key").to_pylist()) == expected


def test_pandas_reads_the_folder(folder, expected):
    frame = pd.read_parquet(folder, columns=["scan_key", "split"])
    assert sorted(frame["scan_key"]) == expected
    assert set(frame["split"]) <= {"train", "test"}


def test_duckdb_reads_the_folder(folder, expected):
    rows = duckdb.sql(f"SELECT scan_key FROM read_parquet('{folder}') ORDER BY scan_key").fetchall()
    assert [r[0] for r in rows] == expected


def test_ray_data_reads_the_folder(folder, expected, ray_local):
    ds = ray_local.data.read_parquet(str(folder)).select_columns(["scan_key"])
    assert sorted(r["scan_key"] for r in ds.take_all()) == expected


def test_an_ingest_killed_midway_leaves_the_old_set_whole(folder, expected, tmp_path, ray_local):
    # Issue 15, item 3: the old set is retired only after the new one is complete. The new
    # cohort's test shard is written well before its larger train shard, and the driver is
    # killed as soon as the first new shard appears: the manifest, and every shard it lists,
    # must still be the old set's.
    out = tmp_path / "shards"
    shutil.copytree(folder, out)
    manifest = (out / shards.MANIFEST).read_text()
    old = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    write_cohort(tmp_path / "cohort", 40, seed=8)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "bonescan_platform.cli", "ingest",
                               "--dicom", str(tmp_path / "cohort" / "dicom"), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    new: set[str] = set()
    deadline = time.time() + 300
    while not new and driver.poll() is None and time.time() < deadline:
        new = {e.name for e in os.scandir(out) if e.name.endswith(".parquet")} - set(old)
        time.sleep(0.002)
    driver.kill()
    output = driver.communicate()[0]
    assert new, f"no new shard appeared before the ingest ended:\n{output[-2000:]}"
    assert (out / shards.MANIFEST).read_text() == manifest
    assert all((out / name).read_bytes() == data for name, data in old.items())
    assert shards.read_table(shards.shard_paths(out), ["patient_key"]).num_rows == len(expected)
    # and the next ingest completes the replacement
    assert main(["ingest", "--dicom", str(tmp_path / "cohort" / "dicom"), "--out", str(out)]) == 0
    assert not set(old) & {s["file"] for s in shards.read_manifest(out)["shards"]}
    assert not any((out / name).exists() for name in old)
