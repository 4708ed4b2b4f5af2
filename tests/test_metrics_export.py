"""Dashboards with data behind them: a short training on a local Ray exports bonescan's
training metrics beside Ray's node metrics; every metric a panel of platform/dashboards/
bonescan.json queries is served by the cluster's metrics endpoints (found, as Prometheus finds
them, in Ray's service-discovery file) and, where Prometheus is installed, Prometheus scraping
them with platform/dashboards/prometheus.yml (started by start.sh) answers every panel's query."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from bonescan_platform import telemetry, train
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "platform" / "dashboards"
TINY = tiny_config(epochs=1, batch_size=2)
RUN = "metrics-run"  # the run folder's name: the `run` tag of its metrics
# Ray's reporter exports these only on nodes where it finds an NVIDIA GPU.
GPU_ONLY = ("ray_node_gpus_", "ray_node_gram_")
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="GPU panel: Ray exports ray_node_gpus_* / ray_node_gram_* only on a GPU node")


def _panels() -> list[dict]:
    dashboard = json.loads((DASHBOARDS / "bonescan.json").read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_\w+)\{", expr))


def _needs_gpu(panel: dict) -> bool:
    return any(name.startswith(GPU_ONLY) for t in panel["targets"] for name in _names(t["expr"]))


PANELS = [pytest.param(p, id=p["title"], marks=[NEEDS_GPU] if _needs_gpu(p) else []) for p in _panels()]


def _scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """One Prometheus text exposition -> {metric name: [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper(threading.Thread):
    """Scrapes every target of Ray's service-discovery file over loopback once a second, and
    keeps the latest samples of each metric seen (a finished worker's gauges are dropped by
    Ray soon after it exits)."""

    def __init__(self, discovery: Path):
        super().__init__(daemon=True)
        self.discovery, self.seen, self.stop = discovery, {}, threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            try:  # Ray rewrites the file every few seconds (atomically)
                targets = [t for group in json.loads(self.discovery.read_text()) for t in group["targets"]]
            except FileNotFoundError:
                continue
            for target in targets:
                port = target.rsplit(":", 1)[1]
                try:
                    self.seen.update(_scrape(f"http://127.0.0.1:{port}/metrics"))
                except OSError:  # a target going away (a node, the autoscaler) is not an error
                    continue


@pytest.fixture(scope="module")
def exported(ray_local, cohort, tmp_path_factory):
    """One short training on the session's Ray, with the cluster's endpoints scraped
    meanwhile and, where installed, Prometheus started by start.sh scraping them too."""
    import ray

    root = tmp_path_factory.mktemp("metrics")
    shards = cohort(6, 5)
    (root / "config.yaml").write_text(yaml.safe_dump(TINY))
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())

    prometheus = None
    if shutil.which("prometheus"):
        env = {**os.environ, "PROMETHEUS_PORT": str(_free_port()), "GRAFANA_PORT": str(_free_port()),
               "BONESCAN_DASHBOARDS_RUN": str(root / "dashboards")}
        subprocess.run(["bash", str(DASHBOARDS / "start.sh"), str(session)], env=env, check=True, timeout=120)
        prometheus = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"
    scraper = Scraper(session / "prom_metrics_service_discovery.json")
    start = time.time()
    try:
        scraper.start()
        assert train.train(str(shards), str(root / "config.yaml"), str(root / RUN)) == 0
        # Workers flush their metrics every few seconds; wait for the last epoch's.
        deadline = time.time() + 30
        while time.time() < deadline and not all(_for_run(scraper.seen, n) for n in telemetry.EXPORTED):
            time.sleep(1)
        if prometheus:
            while time.time() < deadline and not _query_range(prometheus, f'ray_bonescan_epoch{{run="{RUN}"}}', start):
                time.sleep(1)
        scraper.stop.set()
        scraper.join()
        with open(root / RUN / "history.csv") as f:
            (history,) = list(csv.DictReader(f))
        yield {"seen": scraper.seen, "history": history, "prometheus": prometheus, "start": start,
               "session": session.name}
    finally:
        scraper.stop.set()
        pid_file = root / "dashboards" / "prometheus.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def _for_run(seen: dict, name: str) -> list[tuple[dict, float]]:
    return [(labels, value) for labels, value in seen.get(name, []) if labels.get("run") == RUN]


def _query_range(prometheus: str, query: str, start: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": query, "start": start - 60, "end": time.time(), "step": "1s"})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return [series for series in body["data"]["result"] if any(not math.isnan(float(v)) for _, v in series["values"])]


def test_training_metrics_carry_the_run_and_rank_and_the_epoch_values(exported):
    history = exported["history"]
    values = {name: _for_run(exported["seen"], f"ray_{name}") for name in telemetry.GAUGES}
    for name, samples in values.items():
        assert [labels["rank"] for labels, _ in samples] == ["0"], name
    value = {name: samples[0][1] for name, samples in values.items()}
    assert value["bonescan_epoch"] == 1
    assert value["bonescan_train_loss"] == pytest.approx(float(history["train_loss"]))
    assert value["bonescan_val_dsc"] == pytest.approx(float(history["val_dsc"]))
    seconds = float(history["train_seconds"])
    assert value["bonescan_train_images_per_second"] == pytest.approx(int(history["train_images"]) / seconds)
    assert value["bonescan_train_data_wait_fraction"] == pytest.approx(float(history["train_data_wait_seconds"]) / seconds)
    assert 0 <= value["bonescan_train_data_wait_fraction"] <= 1


@pytest.mark.parametrize("panel", PANELS)
def test_every_metric_a_panel_queries_is_exported(exported, panel):
    for target in panel["targets"]:
        for name in _names(target["expr"]):
            samples = _for_run(exported["seen"], name) if name.startswith("ray_bonescan_") else exported["seen"].get(name)
            assert samples, f"{panel['title']}: {name} is not exported"


@pytest.mark.parametrize("panel", PANELS)
def test_prometheus_answers_every_panel_query(exported, panel):
    if exported["prometheus"] is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus)")
    for target in panel["targets"]:
        query = (target["expr"].replace("$SessionName", exported["session"]).replace("$Node", ".+")
                 .replace("$Run", RUN))
        assert _query_range(exported["prometheus"], query, exported["start"]), f"{panel['title']}: no data for {query}"


def test_epoch_values_rates_from_the_epoch_and_dsc_only_where_validated():
    epoch = {"epoch": 3, "train_loss": 0.5, "train_images": 40, "train_seconds": 8.0, "train_data_wait_seconds": 2.0}
    assert telemetry.epoch_values(epoch) == {
        "bonescan_epoch": 3.0, "bonescan_train_loss": 0.5,
        "bonescan_train_images_per_second": 5.0, "bonescan_train_data_wait_fraction": 0.25}
    # Rank 0 validates; an epoch with no timed step reports no rate rather than a division by zero.
    assert telemetry.epoch_values({**epoch, "train_seconds": 0.0, "val_dsc": 0.7}) == {
        "bonescan_epoch": 3.0, "bonescan_train_loss": 0.5, "bonescan_val_dsc": 0.7}
    assert set(telemetry.EXPORTED) == {f"ray_{name}" for name in telemetry.GAUGES}


def test_gpu_panels_say_they_need_gpu_nodes():
    gpu = [p for p in _panels() if _needs_gpu(p)]
    assert {p["title"] for p in gpu} == {"GPU utilization per GPU", "GPU memory used per GPU"}
    assert all("Needs GPU nodes" in p["description"] for p in gpu)


def test_panels_plot_one_series_per_node_gpu_or_run():
    for panel in _panels():
        for target in panel["targets"]:
            by = re.findall(r"by \(([^)]*)\)", target["expr"])
            assert by, f"{panel['title']}: not aggregated per node / GPU / run"
            keys = {key.strip() for group in by for key in group.split(",")}
            assert keys & {"ip", "run"}, panel["title"]
            if _needs_gpu(panel):
                assert "GpuIndex" in keys, panel["title"]


def test_prometheus_discovers_the_cluster_from_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
