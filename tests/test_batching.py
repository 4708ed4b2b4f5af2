"""Two-stream batches (bonescan_model.batching): the labeled scans per step do not depend on
the label fraction."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bonescan_model import batching
from bonescan_model.batching import labeled_indices, rebatched, repeated, two_stream


def _pool(rows: int) -> dict[str, torch.Tensor]:
    return {"image": torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1).expand(rows, 2, 4, 4).clone(),
            "mask": torch.ones(rows, 1, 4, 4)}


def _unlabeled(rows: int, sizes=(3, 1, 5)):
    """An unlabeled stream in batches of uneven sizes, as a Ray Data pass hands them out."""
    start, i = 0, 0
    while start < rows:
        n = min(sizes[i % len(sizes)], rows - start)
        yield {"image": torch.full((n, 2, 4, 4), -1.0 - start), "mask": torch.zeros(n, 1, 4, 4),
               "labeled": torch.zeros(n, dtype=torch.bool)}
        start, i = start + n, i + 1


@pytest.mark.parametrize("labeled_rows, unlabeled_rows", [(3, 57), (12, 48), (30, 30)])  # 5 %, 20 %, 50 % labeled
def test_every_step_carries_the_same_labeled_and_unlabeled_scans(labeled_rows, unlabeled_rows):
    rng = np.random.default_rng(0)
    stream = repeated(lambda number: _unlabeled(unlabeled_rows))
    batches = list(two_stream(_pool(labeled_rows), 2, stream, 4, steps=40, rng=rng))
    assert len(batches) == 40
    for batch in batches:
        assert batch["labeled"].tolist() == [True, True, False, False, False, False]
        assert (batch["image"][:2] >= 0).all() and (batch["image"][2:] < 0).all()  # pool rows, then stream rows
        assert batch["mask"][2:].sum() == 0


def test_the_labeled_pool_is_drawn_evenly_and_the_seed_repeats_it():
    draws = np.concatenate(list(labeled_indices(5, 3, steps=10, rng=np.random.default_rng(1))))
    assert np.bincount(draws, minlength=5).tolist() == [6, 6, 6, 6, 6]  # 30 draws: 6 permutations of 5
    again = np.concatenate(list(labeled_indices(5, 3, steps=10, rng=np.random.default_rng(1))))
    assert (draws == again).all()
    with pytest.raises(ValueError, match="labeled stream is empty"):
        next(labeled_indices(0, 3, steps=1, rng=np.random.default_rng(0)))


def test_a_supervised_only_run_draws_the_labeled_stream_alone():
    batches = list(two_stream(_pool(4), 2, None, 4, steps=3, rng=np.random.default_rng(0)))
    assert [b["labeled"].tolist() for b in batches] == [[True, True]] * 3


def test_rebatched_and_repeated():
    sizes = [len(b["image"]) for b in rebatched(_unlabeled(11), 4)]
    assert sizes == [4, 4]  # the short tail dropped
    passes = []
    stream = repeated(lambda n: passes.append(n) or _unlabeled(2))
    assert len([b for _, b in zip(range(5), stream)]) == 5 and passes[:3] == [0, 1, 2]
    assert list(repeated(lambda n: iter(()))) == []  # an empty stream ends


def test_started_early_hands_over_every_item_in_order():
    assert list(batching.started_early(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert list(batching.started_early(iter([]))) == []


def test_started_early_pulls_before_it_is_asked_and_passes_errors_on():
    pulled = threading.Event()

    def source():
        pulled.set()
        yield "first"
        raise OSError("shard unreadable")

    batches = batching.started_early(source())
    assert pulled.wait(5)  # the first pull happened with nobody consuming yet
    assert next(batches) == "first"
    with pytest.raises(OSError, match="shard unreadable"):
        next(batches)

    def broken():
        raise ValueError("bad first batch")
        yield

    with pytest.raises(ValueError, match="bad first batch"):
        list(batching.started_early(broken()))
