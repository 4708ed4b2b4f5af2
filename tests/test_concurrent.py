"""Commands side by side on one machine (issue 15, items 10 and 11): two `bonescan train` started
at once each run on a private Ray of their own, listening on loopback only, and both finish
with their own metrics; a run whose workers cannot be placed fails in bounded time, saying
what it asked for and what the cluster has."""

from __future__ import annotations

import csv
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from bonescan_platform import cluster
from bonescan_platform.cli import main
from tiny import tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data(cohort):
    return cohort(6, 5)


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _listening(roots: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of ``roots`` and their children."""
    found = set()
    for root in roots:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in processes:
            try:
                found |= {(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN}
            except psutil.Error:  # it ended meanwhile
                continue
    return found


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_two_trains_at_once_each_on_its_own_loopback_ray(data, tmp_path):
    if os.environ.get("RAY_ADDRESS") or cluster._started_cluster():
        pytest.skip("a cluster is joinable here (RAY_ADDRESS or `ray start`): the commands would join it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    drivers = {}
    for name, seed in (("a", 1), ("b", 2)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(epochs=1, seed=seed)))
        drivers[name] = subprocess.Popen(
            [sys.executable, "-m", "bonescan_platform.cli", "train", "--data", str(data), "--config", str(config),
             "--out", str(tmp_path / name)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sockets = set()
    deadline = time.time() + 900
    try:
        while any(d.poll() is None for d in drivers.values()) and time.time() < deadline:
            sockets |= _listening([psutil.Process(d.pid) for d in drivers.values() if d.poll() is None])
            time.sleep(1)
    finally:
        for d in drivers.values():
            if d.poll() is None:
                d.kill()
    outputs = {name: d.communicate()[0] for name, d in drivers.items()}
    for name, d in drivers.items():
        assert d.returncode == 0, outputs[name][-3000:]
        assert "Started a local Ray instance" in outputs[name]  # its own, not the other's
        history = _history(tmp_path / name)
        assert [int(r["epoch"]) for r in history] == [1]
        assert all(float(r["train_loss"]) > 0 for r in history)
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["seed"] == {"a": 1, "b": 2}[name]
    assert _history(tmp_path / "a") != _history(tmp_path / "b")
    # Item 11: GCS, raylet, object manager, dashboard, agents, workers: on loopback, all of them.
    names = {n for n, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    beyond = sorted(s for s in sockets if not _loopback(s[1]))
    assert not beyond, f"listening beyond loopback: {beyond}"


def test_workers_the_cluster_can_never_hold_fail_at_once(data, tmp_path):
    # A private Ray of the command's own cannot grow: 999 GPU workers are refused as it starts.
    if os.environ.get("RAY_ADDRESS") or cluster._started_cluster():
        pytest.skip("a cluster is joinable here (RAY_ADDRESS or `ray start`): the command would join it")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    done = subprocess.run([sys.executable, "-m", "bonescan_platform.cli", "train", "--data", str(data), "--config",
                           str(config), "--out", str(tmp_path / "run"), "--workers", "999", "--gpus"],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'run'}: asks for 999 worker(s) with CPU 1, GPU 1 each and CPU 1 "
                           "to read the data; this machine's Ray has CPU "), line


def test_workers_a_busy_cluster_cannot_place_fail_in_bounded_time(data, tmp_path, ray_local, monkeypatch, capsys):
    # The session's Ray stands for a joined cluster; a placement group holds all of its CPUs.
    from ray.util.placement_group import placement_group, remove_placement_group

    cpus = ray_local.cluster_resources()["CPU"]
    holder = placement_group([{"CPU": cpus}])
    ray_local.get(holder.ready(), timeout=120)
    monkeypatch.setenv(cluster.PLACEMENT_WAIT_ENV, "6")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    start = time.time()
    try:
        code = main(["train", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "run")])
    finally:
        remove_placement_group(holder)
    took = time.time() - start
    err = capsys.readouterr().err
    assert code == 2 and took < 120, (code, took, err[-2000:])
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'run'}: asks for 1 worker(s) with CPU 1 each and CPU 1 to read the "
                           "data; the cluster could not make room within 6 s"), line
    assert f"it has CPU {cpus:g} in all, CPU 0 free now" in line


def test_a_gan_a_busy_cluster_cannot_place_fails_in_bounded_time(data, tmp_path, ray_local, monkeypatch, capsys):
    # `augment --dcgan` trains its GAN on Ray Train: the same bounded wait as `bonescan train`.
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"CPU": ray_local.cluster_resources()["CPU"]}])
    ray_local.get(holder.ready(), timeout=120)
    monkeypatch.setenv(cluster.PLACEMENT_WAIT_ENV, "6")
    start = time.time()
    try:
        code = main(["augment", "--data", str(data), "--out", str(tmp_path / "aug"), "--dcgan", "--samples", "2"])
    finally:
        remove_placement_group(holder)
    took = time.time() - start
    err = capsys.readouterr().err
    assert code == 2 and took < 120, (code, took, err[-2000:])
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'aug' / '_dcgan'}: asks for 1 worker(s) with CPU 1 each and CPU 1 "
                           "to read the data; the cluster could not make room within 6 s"), line


_AUTH_PROBE = """
import json, urllib.error, urllib.request
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from bonescan_platform.cluster import ray_session

def status(headers):
    request = urllib.request.Request(url + "/api/version", headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as err:
        return err.code

with ray_session(num_cpus=1):
    url = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    token = open(__import__("os").path.expanduser("~/.ray/auth_token")).read().strip()
    print(json.dumps({"token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
                      "without": status({}), "wrong": status({"Authorization": "Bearer 0"}),
                      "with": status({"Authorization": "Bearer " + token})}))
"""


def test_a_local_ray_outside_ci_keeps_token_authentication(tmp_path):  # item 11
    # CI and this suite set RAY_AUTH_MODE=disabled; a user's shell does not, and there the
    # command's private Ray must keep Ray's default: token authentication, nothing unauthenticated
    # served even on loopback.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path)  # Ray writes the token to ~/.ray/auth_token
    done = subprocess.run([sys.executable, "-c", _AUTH_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = yaml.safe_load(done.stdout.strip().splitlines()[-1])
    assert said == {"token_mode": True, "without": 401, "wrong": 403, "with": 200}, said
