"""Training throughput and memory: `bonescan train` against a bare PyTorch loop.

Prints five comparisons, each against a baseline measured in the same run (the baseline: a
bare PyTorch loop over the same model, data already decoded in memory, batch size and
augmentation; its share of epoch time in next(batch) is the augmentation's):
1. a bare loop that decodes the shards as it goes vs the baseline (what a loop without Ray
   Data would pay to decode);
2. images/s of `bonescan train` (Ray Train, one worker, Ray Data stream) on a 10x larger
   dataset (`bonescan augment --copies 9`) vs the baseline; goal >= 0.9; with the fraction of
   its epoch time spent waiting for data;
3. the same on the 1x dataset (epochs of a few seconds, where a stream's start-up shows);
4. images/s the Ray Data stream delivers on its own vs images/s the training step consumes
   (the baseline); goal >= 2x;
5. peak memory (RSS summed over this driver and every Ray process) of a training run on the
   10x dataset vs the 1x one; goal: within 20 %.

    python bench/train.py [--patients 40] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

CONFIG = {"model": {"width": 8, "recurrence": 2, "dilations": [1, 2]}, "batch_size": 4,
          "lr": 0.003, "supervised": "dice_ce", "augment": True, "seed": 0}


def bare_loop(data: Path, cfg, epochs: int, decode_as_it_goes: bool = False) -> tuple[float, float]:
    """(images/s, share of epoch time spent in next(batch)) of engine.train_epoch, no Ray anywhere.

    decode_as_it_goes=False: every crop decoded into memory first, so the loop does nothing but
    train (the baseline of the goal). True: the shard rows are held encoded and each batch is
    decoded when it is needed, in the training process, as a loop without Ray Data would."""
    from bonescan_model import engine
    from bonescan_model.network import build_model
    from bonescan_platform import shards, splits, stream
    from bonescan_model.train_config import loss_for
    from bonescan_model.transforms import augmenting

    table = pq.read_table(shards.shard_paths(data, "train"), columns=stream.COLUMNS).to_pydict()
    rows = {k: np.array(v, dtype=object) for k, v in table.items()}
    labeled = frozenset(splits.for_config(data, cfg).labeled)
    n = len(rows["source"])
    if decode_as_it_goes:
        def batch(index):
            return {k: torch.from_numpy(v) for k, v in stream.decode_batch(
                {k: v[index] for k, v in rows.items()}, labeled).items()}
    else:
        tensors = {k: torch.from_numpy(v) for k, v in stream.decode_batch(rows, labeled).items()}

        def batch(index):
            return {k: v[index] for k, v in tensors.items()}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = loss_for(cfg)
    images = seconds = wait = 0.0
    for epoch in range(epochs):
        order = torch.randperm(n).numpy()
        batches = (batch(order[i:i + cfg.batch_size]) for i in range(0, n, cfg.batch_size))
        stats = engine.train_epoch(model, augmenting(batches, np.random.default_rng(epoch)), loss_fn, optimizer)
        if epoch:  # the first epoch warms up allocators and kernels
            images += stats["images"]
            seconds += stats["seconds"]
            wait += stats["data_wait_seconds"]
    return images / seconds, wait / seconds


def stream_rate(data: Path, cfg) -> float:
    """images/s the Ray Data training stream delivers to a consumer that does nothing."""
    from bonescan_platform import splits, stream

    ds = stream.training_dataset(data, list(splits.for_config(data, cfg).labeled))
    rates = []
    for _ in range(3):
        start, n = time.perf_counter(), 0
        for batch in ds.iter_torch_batches(batch_size=cfg.batch_size, prefetch_batches=2):
            n += len(batch["labeled"])
        rates.append(n / (time.perf_counter() - start))
    return max(rates[1:])


class PeakMemory:
    """Peak of the RSS summed over this process and every Ray process, sampled every 0.2 s."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            total = 0
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] == me or "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
                    total += p.info["memory_info"].rss if p.info["memory_info"] else 0
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_train(data: Path, config: Path, run: Path) -> tuple[float, float, int]:
    """(images/s, fraction of epoch time waiting for data, peak bytes) of `bonescan train`."""
    from bonescan_platform.train import train

    with PeakMemory() as memory:
        assert train(str(data), str(config), str(run)) == 0
    from bonescan_platform.runs import Run

    rows = Run(run).history[1:]  # skip the warm-up epoch, as the bare loop does
    images = sum(float(r["train_images"]) for r in rows)
    seconds = sum(float(r["train_seconds"]) for r in rows)
    wait = sum(float(r["train_data_wait_seconds"]) for r in rows)
    return images / seconds, wait / seconds, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    import ray

    from bonescan_model.synth import write_cohort
    from bonescan_platform.augment import augment
    from bonescan_model.train_config import TrainConfig
    from bonescan_platform.ingest import ingest
    from machine import describe  # bench/machine.py

    cfg = TrainConfig.from_dict({**CONFIG, "epochs": args.epochs})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["BONESCAN_SECRET_FILE"] = str(tmp / "secret")
        config = tmp / "bench.yaml"
        config.write_text(yaml.safe_dump({**CONFIG, "epochs": args.epochs}))
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=512 * 1024**2,
                 include_dashboard=False, log_to_driver=False)
        try:
            write_cohort(tmp / "cohort", args.patients, seed=0)
            ingest(str(tmp / "cohort" / "dicom"), str(tmp / "x1"), str(tmp / "cohort" / "labels"))
            augment(str(tmp / "x1"), str(tmp / "x10"), copies=9)
            bare, bare_wait = bare_loop(tmp / "x1", cfg, args.epochs)
            bare_decoding, bare_decoding_wait = bare_loop(tmp / "x1", cfg, args.epochs, decode_as_it_goes=True)
            delivered = stream_rate(tmp / "x10", cfg)
            rate_1x, wait_1x, peak_1x = ray_train(tmp / "x1", config, tmp / "run1")
            config.write_text(yaml.safe_dump({**CONFIG, "epochs": 3}))
            rate, wait, peak_10x = ray_train(tmp / "x10", config, tmp / "run10")
        finally:
            ray.shutdown()

    print(f"\n{describe()}\n"
          f"{args.patients} patients, batch {cfg.batch_size}, model width {cfg.model.width}, t={cfg.model.recurrence}")
    print(f"{'measure':<52} {'value':>10}")
    print(f"{'baseline: bare PyTorch loop, images/s':<52} {bare:>10.2f}")
    print(f"{'  share of epoch time in next(batch): augmentation':<52} {bare_wait:>10.2%}")
    print(f"{'bare loop decoding shards as it goes, images/s':<52} {bare_decoding:>10.2f}")
    print(f"{'  ratio to the baseline':<52} {bare_decoding / bare:>10.2f}")
    print(f"{'  share of epoch time in next(batch)':<52} {bare_decoding_wait:>10.2%}")
    print(f"{'bonescan train (Ray Train, 1 worker), 10x data':<52} {rate:>10.2f}")
    print(f"{'  ratio train / bare (goal >= 0.9)':<52} {rate / bare:>10.2f}")
    print(f"{'  share of epoch time waiting for data':<52} {wait:>10.2%}")
    print(f"{'bonescan train, 1x data (epochs of a few seconds)':<52} {rate_1x:>10.2f}")
    print(f"{'  ratio train / bare':<52} {rate_1x / bare:>10.2f}")
    print(f"{'  share of epoch time waiting for data':<52} {wait_1x:>10.2%}")
    print(f"{'Ray Data stream alone, images/s':<52} {delivered:>10.2f}")
    print(f"{'  ratio stream / training consumption (goal >= 2)':<52} {delivered / bare:>10.2f}")
    print(f"{'peak memory, 1x data (MiB)':<52} {peak_1x / 2**20:>10.0f}")
    print(f"{'peak memory, 10x data (MiB)':<52} {peak_10x / 2**20:>10.0f}")
    print(f"{'  ratio 10x / 1x (goal <= 1.2)':<52} {peak_10x / peak_1x:>10.2f}")


if __name__ == "__main__":
    main()
