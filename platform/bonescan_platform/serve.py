"""`bonescan serve`: the kept model behind an HTTP endpoint, on Ray Serve.

Each replica loads the checkpoint once, with its own threshold, and answers

- ``POST /segment``: one scan as a DICOM body (``Content-Type: application/dicom``) or as a
  ``multipart/form-data`` upload of one file (ANT+POST in one file) or two (one view each) ->
  JSON: the lesions as closed polygons in whole-body ANT pixel coordinates (row, col), each
  with its area and counts, the scan's burden, and the model (run, checkpoint digest, epoch,
  threshold). ``?seg=1`` answers with the DICOM Segmentation object instead
  (``application/dicom``; ``&patient=deidentified`` for a de-identified patient module).
- ``GET /healthz``: 200 and the model, once the replica has loaded it.

Concurrent requests are batched (``serve.batch``): the network sees up to BATCH scans at once,
which is what a GPU replica gains from. Reading a DICOM upload and drawing its contours run in
a thread, so a replica keeps accepting requests while it reads and predicts.

Bad requests get a 4xx and one line of JSON (``{"error": ...}``), never a 5xx or a dead
replica: 413 for a body over ``max_body_mb``, 415 for another content type, 400 for anything
that is not one readable whole-body NM scan (not DICOM, a CT, a truncated file, three files).
The uploaded files are written to a temporary folder of the request's own (pydicom and highdicom
read files) and removed when it is answered. Nothing identifying is logged or answered: the
reader de-identifies (the service answers no keys) and errors name the upload's file name only.
The one exception is the SEG with the source's patient module, which goes back to the PACS
(``bonescan_model.io.seg``).

Metrics: Ray Serve's own (``ray_serve_*``: requests, latencies, batch sizes, per route and
status) and ``ray_bonescan_serve_scans`` (scans answered, per outcome) are exported by Ray's
metrics agent, which Prometheus finds through Ray's service-discovery file
(platform/dashboards/prometheus.yml).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage import measure

from bonescan_model.checkpoint import FILENAME, load_model
from bonescan_model.errors import InputError, shown
from bonescan_model.io.deid import default_secret_path, load_or_create_secret
from bonescan_model.inference import Prediction, predict_scans, read_and_crop, reference_view
from bonescan_platform import storage
from bonescan_platform.cluster import ray_session

APP = "bonescan"
BATCH = 8  # scans the network sees at once: a GPU replica's batch; a CPU replica runs them crop by crop
BATCH_WAIT_S = 0.01  # how long the first request of a batch waits for others
MAX_FILES = 2  # one scan: ANT+POST in one file, or one file per view
DEFAULT_MAX_BODY_MB = 32  # a whole-body scan is ~1 MB; a body far above that is not one scan


class Rejected(Exception):
    """A request answered with a 4xx: its status and one line."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(reason.split())


@dataclass(frozen=True)
class Options:
    """What the driver hands every replica."""

    checkpoint: str  # a local file or a URI each replica reads (the same rule as predict's actors)
    run: str  # the run folder's name: which model answered
    max_body_bytes: int
    gpus: bool
    secret: bytes  # the site secret: the reader's keys, and a de-identified SEG's keyed UIDs


def model_card(trained, checkpoint_bytes: bytes, run: str) -> dict:
    """Which model answers: the run, the checkpoint's SHA-256 (first 16 hex digits), its epoch
    and the threshold its predictions use."""
    return {"run": run, "sha256": hashlib.sha256(checkpoint_bytes).hexdigest()[:16],
            "epoch": trained.meta.get("epoch"), "threshold": trained.threshold}


def answer(prediction: Prediction, counts: np.ndarray, views: tuple[str, ...], model: dict) -> dict:
    """The JSON body of one segmented scan. Lesions in ``contours.mask_to_polygons`` order
    (8-connected components in label order), each its closed polygon (row, col; first point
    repeated last), its area in mm² and the counts of the ANT image inside it."""
    labels = measure.label(prediction.mask, connectivity=2)  # the labelling make_prediction uses
    summed = np.bincount(labels.ravel(), weights=counts.astype(np.float64).ravel(),
                         minlength=prediction.lesions + 1)[1:]
    lesions = [{"polygon": np.round(polygon, 2).tolist(), "area_mm2": round(area, 3), "counts": float(total)}
               for polygon, area, total in zip(prediction.polygons, prediction.lesion_areas_mm2, summed)]
    body = {"model": model,
            "scan": {"name": prediction.name, "views": list(views), "rows": int(counts.shape[0]),
                     "cols": int(counts.shape[1]), "pixel_spacing_mm": prediction.pixel_spacing_mm,
                     "crop_box": list(prediction.crop_box)},
            "lesions": lesions, "lesion_count": prediction.lesions,
            "lesion_area_mm2": round(float(sum(prediction.lesion_areas_mm2)), 3)}
    burden = getattr(prediction, "burden", None)
    if burden is not None:
        body["burden"] = burden.to_json()
    return body


async def read_upload(request, limit: int, folder: Path) -> tuple[list[Path], str]:
    """The request's DICOM file(s), written into ``folder`` -> (paths, the name the scan is
    answered under). Raises Rejected for a body over ``limit`` bytes, another content type, no
    file or more than MAX_FILES. Files are saved under names of our own (upload-0.dcm, ...):
    a client's file name may hold a path."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"the body is {int(declared)} bytes, over the limit of {limit} bytes (one scan)")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/dicom", "multipart/form-data"):
        raise Rejected(415, f"content type {kind or '(none)'!r}: send application/dicom (one file) or "
                            "multipart/form-data (one or two files of one scan)")

    async def capped():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise Rejected(413, f"the body is over the limit of {limit} bytes (one scan)")
            yield chunk

    if kind == "application/dicom":
        body = b"".join([chunk async for chunk in capped()])
        if not body:
            raise Rejected(400, "the body is empty: expected a DICOM file")
        path = folder / "upload-0.dcm"
        path.write_bytes(body)
        return [path], "upload"
    from starlette.formparsers import MultiPartException, MultiPartParser

    try:
        form = await MultiPartParser(request.headers, capped(), max_files=MAX_FILES, max_fields=MAX_FILES,
                                     max_part_size=limit).parse()
    except MultiPartException as err:
        raise Rejected(400, f"the multipart body cannot be read: {err.message}") from None
    uploads = [value for _, value in form.multi_items() if hasattr(value, "read")]
    if not uploads:
        raise Rejected(400, "the multipart body holds no file: expected one or two DICOM files of one scan")
    paths, names = [], []
    for i, upload in enumerate(uploads):
        path = folder / f"upload-{i}.dcm"
        path.write_bytes(await upload.read())
        paths.append(path)
        names.append(Path(upload.filename or "upload").stem)
    return paths, shown(os.path.commonprefix(names).rstrip("_-. ") or "upload")


def build_app(options: Options, replicas: int = 1):
    """The Serve application: one deployment, ``replicas`` copies of the model."""
    from ray import serve
    from ray.serve.metrics import Counter
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    def error(status: int, reason: str) -> Response:
        return JSONResponse({"error": reason}, status_code=status)

    @serve.deployment(name="segment", num_replicas=replicas, ray_actor_options={"num_cpus": 1, "num_gpus": 1 if options.gpus else 0})
    class Segmenter:
        def __init__(self):
            import torch

            torch.set_num_threads(1)  # one CPU per replica (ray_actor_options): replicas share a node's cores
            self.device = "cuda" if options.gpus else "cpu"
            with storage.local_checkpoint(options.checkpoint) as local:
                self.trained = load_model(local, map_location=self.device)
                self.model = model_card(self.trained, Path(local).read_bytes(), options.run)
            self.scans = Counter("bonescan_serve_scans", description="Scans answered by /segment, per outcome.",
                                 tag_keys=("outcome",))

        async def __call__(self, request: Request) -> Response:
            path, method = request.url.path.rstrip("/") or "/", request.method
            if path == "/healthz":
                return JSONResponse({"status": "ok", "model": self.model})
            if path != "/segment":
                return error(404, f"no route {shown(path)!r}: POST /segment, GET /healthz")
            if method != "POST":
                return error(405, "POST a scan to /segment")
            try:
                response = await self.segment(request)
                self.scans.inc(tags={"outcome": "segmented"})
                return response
            except Rejected as err:
                self.scans.inc(tags={"outcome": f"rejected_{err.status}"})
                return error(err.status, err.reason)

        async def segment(self, request: Request) -> Response:
            want_seg = request.query_params.get("seg", "0").lower() in ("1", "true", "yes")
            patient = request.query_params.get("patient", "source")
            if patient not in ("source", "deidentified"):
                raise Rejected(400, f"patient={shown(patient)[:40]!r}: expected source or deidentified")
            with tempfile.TemporaryDirectory(prefix="bonescan-serve-") as tmp:
                paths, name = await read_upload(request, options.max_body_bytes, Path(tmp))
                scan, box = await asyncio.to_thread(self._read, paths, name)
                prediction = await self.predict((scan, box))
                counts = reference_view(scan)
                if want_seg:
                    seg = await asyncio.to_thread(self._seg, paths, prediction, patient)
                    return Response(seg, media_type="application/dicom")
                body = await asyncio.to_thread(answer, prediction, counts, scan.views, self.model)
            return JSONResponse({**body, "scan": {**body["scan"], "name": name}})

        def _read(self, paths: list[Path], name: str):
            """One de-identified scan and its crop box (predict's ``read_and_crop``), or
            Rejected naming the upload."""
            try:
                return read_and_crop([str(p) for p in paths], options.secret)
            except InputError as err:
                raise Rejected(400, f"{name}: {err.reason}") from None

        def _seg(self, paths: list[Path], prediction: Prediction, patient: str) -> bytes:
            from bonescan_model.io import seg

            try:
                dataset = seg.segmentation(paths, prediction.mask, patient=patient, secret=options.secret)
            except (InputError, ValueError) as err:
                raise Rejected(400, f"no DICOM SEG for this scan: {getattr(err, 'reason', err)}") from None
            return seg.to_bytes(dataset)

        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def predict(self, items: list[tuple]) -> list[Prediction]:
            scans, boxes = [s for s, _ in items], [b for _, b in items]
            return await asyncio.to_thread(predict_scans, self.trained.model, scans, boxes=boxes,
                                           threshold=self.trained.threshold, device=self.device)

    return Segmenter.bind()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's server binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _serve_running() -> bool:
    """Whether this cluster already runs Serve: its HTTP options would stay its own, and
    our stop would take down applications not ours."""
    from ray.util import list_named_actors

    # Serve's controller is the named actor SERVE_CONTROLLER_ACTOR in the namespace "serve"
    # (ray.serve._private.constants); asked through the public listing of named actors.
    return any(a["namespace"] == "serve" and a["name"] == "SERVE_CONTROLLER_ACTOR"
               for a in list_named_actors(all_namespaces=True))


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, gpus: bool = False,
          max_body_mb: int = DEFAULT_MAX_BODY_MB, ready_file: str | None = None) -> int:
    """`bonescan serve`: deploy, print where, serve until SIGINT/SIGTERM, then take the
    application down (Serve's controller and proxy are detached actors: they would outlive
    this process and keep their CPUs). ready_file: written once the endpoint answers (for
    scripts and tests that start the service in the background)."""
    if not 1 <= replicas <= 64:
        raise InputError("--replicas", f"{replicas}: expected 1 to 64 replicas")
    if not 1 <= max_body_mb <= 1024:
        raise InputError("--max-body-mb", f"{max_body_mb}: expected 1 to 1024")
    if not 0 < port < 65536:
        raise InputError("--port", f"{port}: expected 1 to 65535")
    checkpoint = storage.absolute(checkpoint)
    with storage.local_checkpoint(checkpoint) as local:
        load_model(local)  # here, so a bad checkpoint fails at once, not in every replica
        checkpoint = checkpoint if storage.is_uri(checkpoint) else str(local)
    run = storage.name(checkpoint.rstrip("/").removesuffix(FILENAME).rstrip("/"))  # the run folder's name
    if not _port_free(host, port):
        raise InputError(f"{host}:{port}", "the port is taken (another service, or a bonescan serve already running)")
    options = Options(checkpoint=checkpoint, run=run, max_body_bytes=max_body_mb * 1024**2, gpus=gpus,
                      secret=load_or_create_secret(default_secret_path()))

    from ray import serve as ray_serve

    stop = threading.Event()
    with ray_session():
        if _serve_running():
            raise InputError("bonescan serve", "Ray Serve already runs on this cluster, with HTTP options of its own; "
                                               "stop it (serve shutdown) or deploy on another cluster")
        ray_serve.start(http_options={"host": host, "port": port})
        try:
            # After ray.init, which installs its own SIGTERM handler (exit at once): a stop must
            # reach the finally below and take the application down.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            ray_serve.run(build_app(options, replicas), name=APP, route_prefix="/")
            url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
            print(f"serving {run} on {url}: POST /segment (a DICOM scan), GET /healthz; "
                  f"{replicas} replica(s) on {'GPU' if gpus else 'CPU'}; Ctrl-C stops", flush=True)
            if ready_file:
                Path(ready_file).write_text(json.dumps({"url": url, "run": run}))
            while not stop.wait(0.5):
                pass
        finally:
            ray_serve.shutdown()
    print("stopped", flush=True)
    return 0
