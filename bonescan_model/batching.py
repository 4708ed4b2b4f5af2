"""Two-stream training batches: a labeled and an unlabeled stream, drawn side by side.

The semi-supervised literature's batches (Tarvainen & Valpola's mean teacher, FixMatch,
UA-MT): each step takes a fixed number of labeled samples and a fixed number of unlabeled
ones, each stream shuffled and repeated on its own. Mixed batches (rows drawn at the label
share) give the supervised term a number of labeled samples per step that falls with the
label fraction, so a label-fraction curve would confound the labels with the supervision a
step gets; here it is constant.

Plain Python and torch: the Ray Train adapter hands in the labeled pool (small: the labeled
scans of a run and their copies, held on each worker) and the unlabeled stream (Ray Data's,
re-read pass after pass); a laptop loop can hand in anything with the same batch dicts.

One epoch's batches for a run (``epoch_batches``: mixed; ``two_stream_batches``: two streams)
take their data from a *shard*: anything with Ray Data's ``iter_torch_batches`` (a
``DataIterator`` on a Train worker); shuffling and augmentation are seeded by
(seed, epoch, rank), so a resumed run draws what an unbroken one would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from bonescan_model.train_config import TrainConfig
from bonescan_model.transforms import augmenting


def labeled_indices(rows: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` index batches of exactly ``batch_size`` into a pool of ``rows``: a seeded
    permutation of the pool, then the next, ..., cut into batches (a batch may span two
    permutations), so every labeled row is drawn equally often."""
    if rows < 1:
        raise ValueError("the labeled stream is empty: two-stream batches need labeled scans")
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(rows)])
        yield order[:batch_size]
        order = order[batch_size:]


def rebatched(batches: Iterable[dict], size: int) -> Iterator[dict]:
    """Batches of exactly ``size`` rows from batches of any size (the tail, if short, dropped)."""
    held: list[dict] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += len(batch["image"])
        while count >= size:
            joined = {k: torch.cat([b[k] for b in held]) for k in held[0]}
            yield {k: v[:size] for k, v in joined.items()}
            rest = {k: v[size:] for k, v in joined.items()}
            count -= size
            held = [rest] if count else []


def repeated(passes: Callable[[int], Iterable[dict]]) -> Iterator[dict]:
    """``passes(0)``, then ``passes(1)``, ...: a stream read again and again (each pass seeded
    by its number); it ends only if a pass yields nothing (an empty stream)."""
    number = 0
    while True:
        empty = True
        for batch in passes(number):
            empty = False
            yield batch
        if empty:
            return
        number += 1


def two_stream(pool: dict[str, torch.Tensor], labeled_batch_size: int, unlabeled: Iterator[dict] | None,
               unlabeled_batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[dict]:
    """``steps`` training batches: ``labeled_batch_size`` rows of the labeled ``pool`` (tensors
    with a first axis of rows: image (N, 2, H, W), mask (N, 1, H, W)), then
    ``unlabeled_batch_size`` rows of ``unlabeled`` (batches of any size, their masks unused),
    each batch's "labeled" flags saying which is which. unlabeled None (or
    unlabeled_batch_size 0, or a stream that runs dry: every scan labeled) gives labeled rows
    alone."""
    extra = rebatched(unlabeled, unlabeled_batch_size) if unlabeled is not None and unlabeled_batch_size else None
    for index in labeled_indices(len(pool["image"]), labeled_batch_size, steps, rng):
        picked = torch.from_numpy(index)
        batch = {"image": pool["image"][picked], "mask": pool["mask"][picked],
                 "labeled": torch.ones(len(index), dtype=torch.bool)}
        more = next(extra, None) if extra is not None else None
        if more is not None:
            batch = {"image": torch.cat([batch["image"], more["image"]]),  # (lb + ub, 2, H, W)
                     "mask": torch.cat([batch["mask"], torch.zeros_like(more["mask"])]),
                     "labeled": torch.cat([batch["labeled"], torch.zeros(len(more["image"]), dtype=torch.bool)])}
        yield batch


# ---------------------------------------------------------------- one epoch of a run
def epoch_batches(train_shard, cfg: TrainConfig, epoch: int, rank: int, shuffle_rows: int) -> Iterator[dict]:
    """One epoch of this worker's training batches, shuffled (over ``shuffle_rows``: the whole
    epoch up to SHUFFLE_ROWS) and augmented, seeded by (seed, epoch, rank)."""
    batches = train_shard.iter_torch_batches(
        batch_size=cfg.scans_per_batch, prefetch_batches=2,
        local_shuffle_buffer_size=shuffle_rows, local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank)
    if cfg.augment:
        batches = augmenting(batches, np.random.default_rng([cfg.seed, epoch, rank]))
    return iter(batches)


def labeled_pool(shard) -> dict[str, torch.Tensor]:
    """The labeled stream's rows, read once: {"image": (N, 2, H, W), "mask": (N, 1, H, W)}."""
    parts = list(shard.iter_torch_batches(batch_size=64))
    if not parts:
        raise ValueError("the labeled stream is empty: two-stream batches need labeled scans")
    return {k: torch.cat([p[k] for p in parts]) for k in ("image", "mask")}


def two_stream_batches(pool: dict[str, torch.Tensor], steps_per_epoch: int, unlabeled_shard, cfg: TrainConfig,
                       epoch: int, rank: int, shuffle_rows: int) -> Iterator[dict]:
    """One epoch of two-stream batches (bonescan_model.batching): ``steps_per_epoch`` steps of
    labeled_batch_size rows of the pool and unlabeled_batch_size rows of this worker's share of
    the unlabeled stream (read again, reshuffled, when an epoch needs more than one pass), then
    augmented; all seeded by (seed, epoch, rank). A supervised-only run (unsupervised_weight
    0) draws no unlabeled rows: nothing would use them."""
    def unlabeled_pass(number: int):
        return unlabeled_shard.iter_torch_batches(
            batch_size=max(1, cfg.unlabeled_scans_per_step), prefetch_batches=2, local_shuffle_buffer_size=shuffle_rows,
            local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + rank + number * 7_919)

    unlabeled = repeated(unlabeled_pass) if cfg.unsupervised_weight > 0 and cfg.unlabeled_batch_size else None
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    batches = two_stream(pool, cfg.labeled_scans_per_step, unlabeled, cfg.unlabeled_scans_per_step,
                         steps_per_epoch, rng)
    if cfg.augment:
        batches = augmenting(batches, rng)
    return iter(batches)


def started_early(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, its first item already being pulled on a background thread.

    Items come out in the same order as from ``batches``; an error raised while pulling the
    first one is raised to the consumer. The thread is a daemon: a worker that fails while a
    pull waits on the other ranks (the epoch barrier) can still exit."""
    first: list = []

    def pull() -> None:
        try:
            first.append(next(batches, _END))
        except BaseException as error:  # handed to the consumer below
            first.append(error)

    thread = threading.Thread(target=pull, name="next-epoch", daemon=True)
    thread.start()

    def handover() -> Iterator[dict]:
        thread.join()
        item = first[0]
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            return
        yield item
        yield from batches

    return handover()


_END = object()
