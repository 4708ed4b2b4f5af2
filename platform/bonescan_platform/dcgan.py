"""The DCGAN task on the Train harness (what `bonescan augment --dcgan` trains), and the
generated rows it adds to a shard set (the paper's D3 = D1 + samples, D4 = D2 + samples).

``gan_loop`` is the adapter each worker runs, as ``segmentation.train_loop`` is for
segmentation: dataset shard -> iter_torch_batches -> gan.train_gan_epoch -> ``harness.report``
(with a checkpoint and the Fréchet distance between real and generated crops). The GAN learns from
the original crops of the train split only: a test image must not leak into training data
through its synthetic look-alikes.

A GAN run folder (``<augment --out>/_dcgan/`` unless ``--gan`` names a trained one;
``runs.GanRun``) holds: the resolved GanConfig, the record (data, workers, devices), train/ (Ray
Train's checkpoints; a rerun resumes from them), gan.pt (the checkpoint with the lowest Fréchet
distance) and the history (one row per checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bonescan_model import gan as dcgan
from bonescan_model.metrics import frechet_distance, frechet_features
from bonescan_model.gan_network import Discriminator, GanConfig, Generator
from bonescan_model.errors import InputError
from bonescan_model.preprocess import CROP_SIZE, model_input, normalize_counts
from bonescan_model.progress import progress
from bonescan_model.train_config import read_yaml
from bonescan_platform import cluster, harness, shards, stream
from bonescan_platform.runs import HISTORY_CSV, GanRun, RunRecord

# The GAN run's folder and the sample sheet inside the augment output folder: "_" names, which
# Parquet readers of the shard folder skip (shards.py).
RUN_DIR = "_dcgan"
SHEET = "_samples.png"
# The Fréchet distance compares the first REFERENCE_CROPS original training crops with the
# same number of samples drawn with FRECHET_SEED, the same ones at every checkpoint.
REFERENCE_CROPS = 64
FRECHET_SEED = 2_147_483_647
SHEET_CROPS = 4
GENERATE_BATCH = 32
# Real patient and scan keys are HMAC-SHA256 hex digests: exactly 64 characters of [0-9a-f].
# "dcgan-" holds '-', 'g' and 'n', none of them hex, and makes the key 70 characters long, so
# no generated key can ever equal a real one, whatever the site secret.
KEY_PREFIX = "dcgan-"
SOURCE = "dcgan"


# ---------------------------------------------------------------- the worker: a thin adapter
def gan_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = GanConfig.from_dict(loop_config["gan"])
    levels = np.asarray(loop_config["levels"], np.float32)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(loop_config["torch_threads"])
    torch.manual_seed(cfg.seed)
    generator = ray.train.torch.prepare_model(Generator(cfg))
    discriminator = ray.train.torch.prepare_model(Discriminator(cfg))
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
                    for net in (generator, discriminator))
    device = ray.train.torch.get_device()
    start, history = harness.restore(ray.train.get_checkpoint(),
                                     functools.partial(load_state, generator, discriminator, opt_g, opt_d))
    reference = _reference_features(ray.train.get_dataset_shard("reference")) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.epochs):
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, prefetch_batches=2, dtypes=torch.float32,
                                           local_shuffle_buffer_size=4 * cfg.batch_size,
                                           local_shuffle_seed=cfg.seed + epoch)
        real = (b["image"] for b in batches)
        # Noise seeded per (seed, epoch, rank): a resumed run draws what an unbroken one would.
        noise = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0]))
        stats = dcgan.train_gan_epoch(generator, discriminator, real, opt_g, opt_d, noise=noise,
                                      d_steps=cfg.d_steps, device=device)
        if (epoch + 1) % cfg.checkpoint_every and epoch + 1 < cfg.epochs:
            continue
        metrics = {"epoch": epoch + 1, "train_workers": context.get_world_size(), **stats}
        frozen = None
        if rank == 0:  # on one rank: the reference set is small, and sampling needs no sync
            frozen = dcgan.calibrated(generator)  # what the checkpoint keeps and samples come from
            samples = dcgan.sample_images(frozen, range(len(reference)), FRECHET_SEED)
            metrics["frechet"] = frechet_distance(reference, frechet_features(samples))
        history.append(metrics)
        harness.report(metrics, history, rank,
                       functools.partial(save_state, frozen, discriminator, opt_g, opt_d, cfg, levels, metrics))


def _reference_features(shard) -> np.ndarray:
    images = [b["image"] for b in shard.iter_torch_batches(batch_size=REFERENCE_CROPS, dtypes=torch.float32)]
    return frechet_features(torch.cat(images)[:REFERENCE_CROPS])


def save_state(frozen, discriminator, opt_g, opt_d, cfg: GanConfig, levels: np.ndarray, metrics: dict,
               folder: Path) -> dict:
    """A checkpoint's gan.pt (rank 0's calibrated copy of the generator, ``frozen``: what
    samples come from); returns what else resuming needs (both optimizers)."""
    dcgan.save_gan_checkpoint(folder / dcgan.FILENAME, frozen, discriminator, cfg, levels,
                              epoch=metrics["epoch"], metrics=metrics)
    return {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}


def load_state(generator, discriminator, opt_g, opt_d, folder: Path, state: dict) -> None:
    """``save_state`` undone: both networks, both optimizers."""
    saved_g, saved_d, *_ = dcgan.load_gan_checkpoint(folder / dcgan.FILENAME)
    getattr(generator, "module", generator).load_state_dict(saved_g.state_dict())
    getattr(discriminator, "module", discriminator).load_state_dict(saved_d.state_dict())
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])


# ---------------------------------------------------------------- the driver
def load_gan_config(path: str | os.PathLike | None) -> GanConfig:
    """A GanConfig from YAML (any GanConfig key; the rest keep their defaults); None: defaults."""
    if path is None:
        return GanConfig()
    path = Path(path)
    data = read_yaml(path, "GAN config") or {}
    if not isinstance(data, dict):
        raise InputError(path, "a GAN config must be a mapping of keys to values")
    try:
        cfg = GanConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise InputError(path, str(err)) from None
    if cfg.size != CROP_SIZE:
        raise InputError(path, f"size must be {CROP_SIZE}: the shards hold {CROP_SIZE} x {CROP_SIZE} crops")
    return cfg


def resolve_gan(path: str | os.PathLike) -> Path:
    """A trained GAN (a GAN run folder or its gan.pt) -> its gan.pt, checked to load."""
    path = Path(path)
    path = path / dcgan.FILENAME if path.is_dir() else path
    _, _, cfg, _, _ = dcgan.load_gan_checkpoint(path)
    if cfg.size != CROP_SIZE:
        raise InputError(path, f"makes {cfg.size} x {cfg.size} crops; the shards hold {CROP_SIZE} x {CROP_SIZE}")
    return path


def gan_summary(gan_path: Path) -> dict:
    """What the manifest records of the GAN: its config, epoch and Fréchet distance."""
    _, _, cfg, _, meta = dcgan.load_gan_checkpoint(gan_path)
    return {"gan_config": dataclasses.asdict(cfg), "epoch": meta.get("epoch"),
            "frechet": meta.get("metrics", {}).get("frechet")}


def train_gan(data: Path, run: Path, cfg: GanConfig, workers: int = 1, gpus: bool = False) -> Path:
    """Train (or resume, or reuse) the GAN of ``data`` in ``run``; returns its gan.pt.

    Needs a Ray session. A run folder that already holds a finished GAN of this config and
    data is reused as is; one with another config or data is refused rather than mixed.
    """
    data, gan_run = Path(data).resolve(), GanRun(Path(run).resolve())
    run = gan_run.root
    config = dataclasses.asdict(cfg)
    if gan_run.config is not None:
        if gan_run.config != config:
            raise InputError(run, "holds a GAN trained with another config; remove it or pass that config")
        if gan_run.record.data != str(data):
            raise InputError(run, "holds a GAN trained on other shards; remove it or use --gan")
        if (run / dcgan.FILENAME).is_file():
            print(f"dcgan: using the trained GAN in {run}")
            return run / dcgan.FILENAME
    gan_run.start(config, RunRecord(data=str(data), workers=workers, gpus=gpus, trainer="dcgan"))
    import ray

    # As `bonescan train` does: a bounded wait for room (before Ray Data reads the crops
    # too), never Ray's endless one.
    per_worker = harness.worker_resources(harness.worker_cpus(ray.cluster_resources().get("CPU", 1), workers, gpus)[0], gpus)
    cluster.wait_for_room(str(run), workers, per_worker)
    originals = original_dataset(data, cfg.views)
    levels = [b["levels"] for b in originals.select_columns(["levels"]).iter_batches(batch_size=None,
                                                                                      batch_format="numpy")]
    levels = np.concatenate(levels) if levels else np.zeros((0, cfg.channels), np.float32)
    if len(levels) < 2:
        raise InputError(data, f"the train split holds {len(levels)} original crops; the DCGAN needs at least 2")
    result = harness.fit(trainer_for(run, cfg, originals, levels, workers, gpus), str(run), gpus)
    return finish_gan_run(gan_run, result)


def original_dataset(data: Path, views: str):
    """The train split's original crops as the GAN sees them, with their count levels:
    rows {"image": (C, 256, 256) float32 in [-1, 1], "levels": (C,) float32}, in file order.

    Materialized: the originals are the paper's D1, a few hundred crops (0.5 MB each in the
    object store; Ray spills to disk past its memory). Streamed, every epoch of a few batches
    would spend more time restarting Ray Data (~1.5 s) than training.
    """
    import ray

    ds = ray.data.read_parquet(shards.shard_paths(data, "train")).select_columns(["ant", "post", "source"])
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds.map_batches(_gan_batch, batch_format="numpy", batch_size=stream.DECODE_BATCH,
                          fn_kwargs={"views": views}).materialize()


def _gan_batch(batch: dict[str, np.ndarray], views: str) -> dict[str, np.ndarray]:
    rows = zip(batch["ant"], batch["post"], batch["source"])
    counts = [np.stack(_both_views(ant, post)) for ant, post, source in rows if str(source) in stream.ORIGINAL_SOURCES]
    if not counts:
        channels = GanConfig(views=views).channels
        return {"image": np.zeros((0, channels, CROP_SIZE, CROP_SIZE), np.float32),
                "levels": np.zeros((0, channels), np.float32)}
    counts = np.stack(counts)  # (B, 2, H, W) uint16
    images = normalize_counts(counts)  # as segmentation training sees them (model_input, views already filled)
    return {"image": dcgan.gan_images(images, views), "levels": dcgan.count_levels(counts, views)}


def _both_views(ant: bytes | None, post: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """A row's (ANT, mirrored POST) counts; a one-view crop repeats its view (as model_input)."""
    ant = None if ant is None else shards.decode_image(ant, "<u2")
    post = None if post is None else shards.decode_image(post, "<u2")
    return (post if ant is None else ant), (ant if post is None else post)


def trainer_for(run: Path, cfg: GanConfig, originals, levels: np.ndarray, workers: int, gpus: bool):
    """The TorchTrainer of one GAN run (``harness.trainer``), checkpoints ranked by the lowest
    Fréchet distance.

    originals: ``original_dataset``; levels: its (N, C) count levels, saved in every checkpoint."""
    import ray

    cpu_per_worker, torch_threads = harness.worker_cpus(ray.cluster_resources().get("CPU", 1), workers, gpus)
    originals = originals.select_columns(["image"])
    return harness.trainer(
        gan_loop, {"gan": dataclasses.asdict(cfg), "levels": levels.tolist(), "torch_threads": torch_threads},
        storage_path=str(run), workers=workers, gpus=gpus, cpu_per_worker=cpu_per_worker,
        datasets={"train": originals, "reference": originals.limit(REFERENCE_CROPS)}, metric="frechet", mode="min")


def finish_gan_run(run: GanRun, result) -> Path:
    """Keep the checkpoint with the lowest Fréchet distance as gan.pt, and the history of
    every checkpoint."""
    kept = run.root / ".gan.pt.tmp"
    history = harness.keep_best(result, "frechet", "min", dcgan.FILENAME, kept)
    run.write_history(history)
    # Last: gan.pt is what tells a rerun that this GAN is finished.
    os.replace(kept, run.root / dcgan.FILENAME)
    distances = ", ".join(f"{row['frechet']:.3f}" for row in history)
    print(f"dcgan: trained {history[-1]['epoch']} epochs; Fréchet distance per checkpoint: {distances}; "
          f"GAN: {run.root / dcgan.FILENAME}, history: {run.where(HISTORY_CSV)}")
    return run.root / dcgan.FILENAME


# ---------------------------------------------------------------- generated rows
def sample_key(digest: str, seed: int, index: int, kind: str) -> str:
    """The patient or scan key of sample ``index``: KEY_PREFIX + 64 hex (see KEY_PREFIX for
    why it can never equal a real key). Each sample is a patient of its own."""
    return KEY_PREFIX + hashlib.sha256(f"{digest}|{seed}|{index}|{kind}".encode()).hexdigest()


def generated_tables(gan_path: Path, samples: int, seed: int, pixel_spacing_mm: float) -> Iterator[pa.Table]:
    """``samples`` generated crops as shard rows, GENERATE_BATCH at a time.

    Rows: source "dcgan", split "train" (a sample has no patient to test on), no mask, no
    readers, the crop box the whole 256 x 256 image, the real crops' median pixel spacing.
    Sample i depends on (GAN, seed, i) only."""
    generator, _, cfg, levels, _ = dcgan.load_gan_checkpoint(gan_path)
    generator.to("cuda" if torch.cuda.is_available() else "cpu")
    digest = dcgan.generator_digest(generator)
    with progress(total=samples, desc="dcgan samples", unit="crop") as bar:
        for start in range(0, samples, GENERATE_BATCH):
            indices = range(start, min(start + GENERATE_BATCH, samples))
            counts = dcgan.sample_counts(generator, levels, indices, seed)  # (n, C, 256, 256) uint16
            bar.update(len(indices))
            yield _generated_table(digest, seed, indices, counts, cfg.views, pixel_spacing_mm)


def _generated_table(digest: str, seed: int, indices: range, counts: np.ndarray, views: str,
                     pixel_spacing_mm: float) -> pa.Table:
    rows = [shards.shard_row(
        patient_key=sample_key(digest, seed, i, "patient"), scan_key=sample_key(digest, seed, i, "scan"),
        # An aggregated sample is one image: stored as a one-view crop, which the stream
        # repeats into both input channels.
        ant=crop[0], post=crop[1] if views == "both" else None, mask=None,
        crop_box=[0, 0, CROP_SIZE, CROP_SIZE], pixel_spacing_mm=pixel_spacing_mm, readers_agree=None,
        source=SOURCE, split="train", views="ANT+POST" if views == "both" else "ANT",
    ) for i, crop in zip(indices, counts)]
    return pa.Table.from_pylist(rows, schema=shards.SCHEMA)


def median_spacing(data: Path) -> float:
    """The median pixel spacing of the train split's original crops (one small column)."""
    paths = shards.shard_paths(data, "train")
    table = shards.read_table(paths, ["pixel_spacing_mm", "source"]).to_pydict() if paths else {}
    spacings = [spacing for spacing, source in zip(table.get("pixel_spacing_mm", []), table.get("source", []))
                if source in stream.ORIGINAL_SOURCES]
    if not spacings:
        raise InputError(data, "the train split holds no original crops to learn from or show beside samples")
    return float(statistics.median(spacings))


def original_crops(data: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` original training crops, as (2, H, W) model input."""
    def rows():
        for path in shards.shard_paths(data, "train"):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=16, columns=["ant", "post", "source"]):
                yield from batch.to_pylist()

    originals = (row for row in rows() if row["source"] in stream.ORIGINAL_SOURCES)
    return [model_input(*_both_views(row["ant"], row["post"])) for row in itertools.islice(originals, count)]


def write_sheet(data: Path, out: Path, gan_path: Path, seed: int) -> Path:
    """out/_samples.png: the first original training crops of ``data`` beside the first
    generated crops written to ``out`` (the counts in the shards, normalized as training sees them)."""
    generator, _, cfg, levels, _ = dcgan.load_gan_checkpoint(gan_path)
    real = original_crops(data, SHEET_CROPS)
    counts = dcgan.sample_counts(generator, levels, range(SHEET_CROPS), seed)
    generated = [model_input(c[0], c[1] if cfg.views == "both" else None) for c in counts]
    return dcgan.write_sample_sheet(dcgan.gan_images(np.stack(real), cfg.views),
                                    dcgan.gan_images(np.stack(generated), cfg.views), out / SHEET)
