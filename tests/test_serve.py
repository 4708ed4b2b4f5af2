"""`bonescan serve`: the kept model as an HTTP service on Ray Serve, started as a user starts it
(a subprocess joined to the session's Ray, on a free loopback port), asked good and bad
scans, and stopped with SIGTERM.

The checkpoint is a tiny model whose answer is known (the final 1x1 convolution's weights 0,
its bias +10: every crop pixel is a lesion), and each answer is checked against `bonescan
predict`'s own functions on the same files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from bonescan_model.checkpoint import load_checkpoint
from bonescan_model.io.dicom import PatientIdentity, read_scan, write_whole_body
from bonescan_model.inference import predict_scan
from bonescan_model.synth import synth_patient
from one_line import fails
from tiny import constant_run

IDENTITY = PatientIdentity("PID7340921", "SERVEDOE^JANE", "19380214", "20240102", generate_uid(), generate_uid())
OTHER = PatientIdentity("PID5517730", "SERVEROE^JOHN", "19410930", "20240103", generate_uid(), generate_uid())
MAX_BODY_MB = 2
START_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-scans")
    patient = synth_patient(5, 0)
    return {"multiframe": write_whole_body(root / "a", "wb", patient.ant, patient.post, identity=IDENTITY),
            "two-files": write_whole_body(root / "b", "wb", patient.ant, patient.post, identity=OTHER,
                                          layout="two-files"),
            "root": root}


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_local, deid_secret):
    """`bonescan serve` on a free loopback port, joined to the session's Ray; stopped with
    SIGTERM at the end (its own test checks that stop)."""
    root = tmp_path_factory.mktemp("serve")
    run = constant_run(root / "kept-run")
    port, ready = _free_port(), root / "ready.json"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bonescan_platform.cli", "serve", "--checkpoint", str(run),
                             "--port", str(port), "--max-body-mb", str(MAX_BODY_MB), "--ready-file", str(ready)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + START_S
    while not ready.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    if not ready.is_file():
        proc.kill()
        pytest.fail(f"bonescan serve did not start: {(root / 'serve.log').read_text()[-2000:]}")
    yield {"url": json.loads(ready.read_text())["url"], "proc": proc, "log": root / "serve.log", "run": run}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    log.close()


def _expected(files: list[Path]):
    """What `bonescan predict` finds on the same files with the same model."""
    return predict_scan(load_checkpoint(constant_run(Path(files[0]).parent / "expected-run"))[0], read_scan(files, b"k" * 32))


def _post_file(url: str, path: Path, **kwargs) -> requests.Response:
    return requests.post(f"{url}/segment", data=path.read_bytes(),
                         headers={"Content-Type": "application/dicom"}, timeout=60, **kwargs)


def test_healthz_names_the_model_and_its_threshold(service):
    reply = requests.get(f"{service['url']}/healthz", timeout=30)
    assert reply.status_code == 200
    model = reply.json()["model"]
    assert model["run"] == "kept-run" and model["threshold"] == 0.5 and len(model["sha256"]) == 16


@pytest.mark.parametrize("layout", ["multiframe", "two-files"])
def test_a_scan_is_answered_with_the_contours_predict_finds(service, scans, layout):
    files = scans[layout]
    if layout == "multiframe":
        reply = _post_file(service["url"], files[0])
    else:
        reply = requests.post(f"{service['url']}/segment", timeout=60,
                              files=[(f"view{i}", (f.name, f.read_bytes(), "application/dicom"))
                                     for i, f in enumerate(files)])
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = _expected(files)
    assert body["lesion_count"] == expected.lesions == 1
    assert body["scan"]["views"] == ["ANT", "POST"] and body["scan"]["crop_box"] == list(expected.crop_box)
    (lesion,) = body["lesions"]
    np.testing.assert_allclose(lesion["polygon"], np.round(expected.polygons[0], 2))
    assert lesion["area_mm2"] == pytest.approx(expected.lesion_areas_mm2[0], abs=1e-3)
    # every crop pixel is a lesion: its counts are the ANT counts inside the crop box
    row0, col0, rows, cols = expected.crop_box
    ant = read_scan(files, b"k" * 32).ant
    assert lesion["counts"] == pytest.approx(float(ant[max(row0, 0):row0 + rows, max(col0, 0):col0 + cols].sum()))
    assert body["model"]["run"] == "kept-run"
    if layout == "two-files":
        assert body["scan"]["name"] == "wb"  # the uploads' common stem (wb_ANT, wb_POST)


@pytest.mark.parametrize("patient", ["source", "deidentified"])
def test_seg_on_request_is_valid_dicom_with_the_predicted_mask(service, scans, tmp_path, patient):
    import highdicom

    from test_seg import _dciodvfy, _frames_by_source, _sop_uids

    files = scans["multiframe"]
    reply = _post_file(service["url"], files[0], params={"seg": "1", "patient": patient})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/dicom", reply.text
    (tmp_path / "scan.seg.dcm").write_bytes(reply.content)
    errors, _ = _dciodvfy(tmp_path / "scan.seg.dcm")
    assert errors == []
    seg = highdicom.seg.segread(tmp_path / "scan.seg.dcm")
    if patient == "source":
        ant, post = _frames_by_source(seg, files, "multiframe")
        expected = _expected(files).mask
        np.testing.assert_array_equal(ant, expected)
        np.testing.assert_array_equal(post, expected[:, ::-1])  # POST in its own orientation
    else:
        assert not any(u.encode() in reply.content for u in _sop_uids(files))
        assert IDENTITY.patient_id.encode() not in reply.content


def test_concurrent_requests_are_all_answered_alike(service, scans):
    path = scans["multiframe"][0]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: _post_file(service["url"], path), range(32)))
    assert [r.status_code for r in replies] == [200] * 32
    assert len({json.dumps(r.json()["lesions"]) for r in replies}) == 1


def _bad_requests(scans) -> list[tuple[str, dict, int, str]]:
    root = scans["root"]
    good = scans["multiframe"][0].read_bytes()
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    dicom = {"Content-Type": "application/dicom"}
    two = scans["two-files"]
    (root / "c").mkdir(exist_ok=True)
    return [
        ("not DICOM", {"data": b"hello, not a scan", "headers": dicom}, 400, "not a DICOM file"),
        ("a CT", {"data": ct, "headers": dicom}, 400, "modality is CT"),
        ("truncated", {"data": good[:5000], "headers": dicom}, 400, "truncated"),
        ("empty", {"data": b"", "headers": dicom}, 400, "empty"),
        ("wrong content type", {"data": good, "headers": {"Content-Type": "text/plain"}}, 415, "content type"),
        ("over the body limit", {"data": b"\0" * (MAX_BODY_MB * 1024**2 + 1), "headers": dicom}, 413, "limit"),
        ("three files", {"files": [(f"f{i}", (f"f{i}.dcm", good[:2000])) for i in range(3)]}, 400, "Too many files"),
        ("files of two series", {"files": [("a", ("a.dcm", good)), ("b", ("b.dcm", two[1].read_bytes()))]},
         400, "different series"),
        ("an unknown patient module", {"data": good, "headers": dicom, "params": {"seg": "1", "patient": "x"}},
         400, "expected source or deidentified"),
        ("a broken multipart body", {"data": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
         400, "multipart"),
    ]


def test_bad_requests_get_a_4xx_and_one_line_and_the_replica_lives(service, scans):
    for what, kwargs, status, words in _bad_requests(scans):
        reply = requests.post(f"{service['url']}/segment", timeout=60, **kwargs)
        assert reply.status_code == status, (what, reply.status_code, reply.text)
        assert "\n" not in reply.text.strip() and words in reply.json()["error"], (what, reply.text)
    assert requests.get(f"{service['url']}/segment", timeout=30).status_code == 405
    assert requests.get(f"{service['url']}/nothing", timeout=30).status_code == 404
    assert requests.get(f"{service['url']}/healthz", timeout=30).status_code == 200
    assert _post_file(service["url"], scans["multiframe"][0]).status_code == 200


def test_rays_metrics_count_the_requests(service, ray_local, scans):
    from prometheus_client.parser import text_string_to_metric_families

    assert _post_file(service["url"], scans["multiframe"][0]).status_code == 200
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    targets = [t for group in json.loads((session / "prom_metrics_service_discovery.json").read_text())
               for t in group["targets"]]
    seen: dict[str, float] = {}
    deadline = time.time() + 60
    while time.time() < deadline and not ({"ray_bonescan_serve_scans", "ray_serve_num_http_requests"} <= set(seen)):
        for target in targets:
            text = requests.get(f"http://{target}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                if family.name in ("ray_bonescan_serve_scans", "ray_serve_num_http_requests"):
                    seen[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        time.sleep(2)
    assert seen.get("ray_bonescan_serve_scans", 0) >= 1, seen
    assert seen.get("ray_serve_num_http_requests", 0) >= 1, seen


def test_nothing_identifying_is_answered_or_logged(service, scans, ray_local):
    needles = {v for ident in (IDENTITY, OTHER) for v in
               (ident.patient_id, ident.patient_name, ident.patient_name.split("^")[0], ident.birth_date,
                ident.study_uid, ident.series_uid)}
    replies = [_post_file(service["url"], scans["multiframe"][0]).text,
               requests.post(f"{service['url']}/segment", timeout=60,
                             files=[(f"v{i}", (f.name, f.read_bytes())) for i, f in enumerate(scans["two-files"])]).text]
    logs = [service["log"]] + list(
        (Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs").rglob("*"))
    blobs = [p.read_bytes() for p in logs if p.is_file()]
    for needle in needles:
        assert not any(needle in reply for reply in replies), needle
        assert not any(needle.encode() in blob for blob in blobs), needle


def test_a_second_service_on_the_same_cluster_is_refused(service, ray_local):
    """Serve's HTTP options are the first one's: a second would print a port nobody serves."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "bonescan_platform.cli", "serve", "--checkpoint", str(service["run"]),
                           "--port", str(_free_port())], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Ray Serve already runs" in lines[0] and "Traceback" not in done.stderr
    assert requests.get(f"{service['url']}/healthz", timeout=30).status_code == 200


def test_sigterm_takes_the_service_down(service):
    proc = service["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert "stopped" in service["log"].read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{service['url']}/healthz", timeout=5)


# Refused before Ray starts (the fast layer).
@pytest.mark.parametrize("args, path, words", [
    (["--replicas", "0"], "--replicas", "expected 1 to 64"),
    (["--max-body-mb", "0"], "--max-body-mb", "expected 1 to 1024"),
])
def test_bad_options_are_one_line(args, path, words, tmp_path, capsys):
    run = constant_run(tmp_path / "run")
    fails(capsys, "serve", "--checkpoint", run, *args, path=path, words=words)


def test_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    fails(capsys, "serve", "--checkpoint", tmp_path / "model.pt", path=tmp_path / "model.pt", words="")


def test_a_taken_port_is_one_line(tmp_path, capsys):
    run = constant_run(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        fails(capsys, "serve", "--checkpoint", run, "--port", port, path=f"127.0.0.1:{port}", words="taken")
