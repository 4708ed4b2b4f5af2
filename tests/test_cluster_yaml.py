"""cluster.yaml and cluster-onprem.yaml: what `ray up` accepts, checked offline with Ray's own
config preparation and schema validation; and the promises the README makes about them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def _prepared(name: str) -> dict:
    # What `ray up` does before it talks to a provider: fill the provider's defaults in, merge
    # the setup commands, then validate against ray-schema.json.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / name).read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_cluster_config(name):
    config = _prepared(name)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", CONFIGS)
def test_dashboard_and_job_server_listen_on_the_head_loopback_only(name):
    config = _prepared(name)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    # Nothing may bind a public address, whatever the provider's defaults would have said.
    assert "0.0.0.0" not in yaml.safe_dump(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_exports_metrics_and_the_head_starts_the_dashboards(name):
    config = _prepared(name)
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "--metrics-export-port=8080" in " ".join(config[commands]), commands
    assert any("platform/dashboards/start.sh" in c for c in config["head_start_ray_commands"])


@pytest.mark.parametrize("name", CONFIGS)
def test_nodes_install_this_project_with_the_readme_torch_pin(name):
    config = _prepared(name)
    (pin,) = set(re.findall(r"torch==([\w.+]+)", (REPO / "README.md").read_text()))
    assert config["file_mounts"] == {"~/bonescan": "."}
    for commands in ("head_setup_commands", "worker_setup_commands"):
        text = " ".join(config[commands])
        assert set(re.findall(r"torch==([\w.+]+)", text)) == {pin}, commands
        assert "-e ~/bonescan" in text, commands


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_mounts_the_shared_storage(name):
    config = _prepared(name)
    for commands in ("head_setup_commands", "worker_setup_commands"):
        assert re.search(r"mount -t nfs4? .* /mnt/bonescan", " ".join(config[commands])), commands


def test_cloud_cluster_autoscales_gpu_workers():
    config = _prepared("cluster.yaml")
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] for t in workers.values())
    # PyPI's Linux torch wheel is the CUDA build; the CPU index is for the head only.
    assert "whl/cpu" not in " ".join(config["worker_setup_commands"])
    assert "whl/cpu" in " ".join(config["head_setup_commands"])


def test_onprem_cluster_lists_its_hosts():
    config = _prepared("cluster-onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
