"""Geometric augmentation (D2): transforms on hand-made images, then `bonescan augment` on Ray."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from skimage.transform import rotate

from bonescan_model.transforms import Transform, apply, augment_batch, distinct_transforms, random_transform
from bonescan_model.errors import InputError
from bonescan_platform import shards

H = W = 256
TRANSFORMS = {
    "hflip": Transform(hflip=True),
    "vflip": Transform(vflip=True),
    "rot": Transform(angle_deg=12.0),
    "shift": Transform(shift_px=(9, -14)),
    "all": Transform(hflip=True, vflip=True, angle_deg=-15.0, shift_px=(-16, 16)),
}


def _square_scan(rng, top_left=(90, 110), size=24, views=2):
    """Low background counts, one bright square lesion, and its mask. views: (2, H, W) uint16."""
    counts = rng.integers(0, 50, size=(views, H, W)).astype(np.uint16)
    mask = np.zeros((H, W), np.uint8)
    r, c = top_left
    counts[:, r : r + size, c : c + size] = 1000
    mask[r : r + size, c : c + size] = 1
    return counts, mask


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


@pytest.mark.parametrize("name", TRANSFORMS)
def test_views_and_mask_move_together(name):
    views, mask = _square_scan(np.random.default_rng(0))
    out_views, out_mask = apply(TRANSFORMS[name], views, mask)
    assert out_views.dtype == np.uint16 and out_views.shape == views.shape
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) == {0, 1}
    for view in out_views:  # ANT and mirrored POST: the lesion stays where the mask says
        assert _iou(view > 500, out_mask == 1) > 0.9


@pytest.mark.parametrize("name", TRANSFORMS)
def test_full_scale_counts_do_not_overflow(name):
    views = np.full((2, H, W), np.iinfo(np.uint16).max, np.uint16)
    out, _ = apply(TRANSFORMS[name], views)
    # Wrap-around would turn the saturated interior into small numbers.
    assert out[:, H // 2 - 50 : H // 2 + 50, W // 2 - 50 : W // 2 + 50].min() == 65535


@pytest.mark.parametrize("name", ["hflip", "vflip"])
def test_flips_are_exact_involutions(name):
    views, mask = _square_scan(np.random.default_rng(1), top_left=(10, 200))
    once = apply(TRANSFORMS[name], views, mask)
    twice = apply(TRANSFORMS[name], *once)
    assert not np.array_equal(once[0], views)
    np.testing.assert_array_equal(twice[0], views)
    np.testing.assert_array_equal(twice[1], mask)
    assert once[0].sum(dtype=np.int64) == views.sum(dtype=np.int64)


def test_hflip_is_a_left_right_mirror():
    views, mask = _square_scan(np.random.default_rng(2))
    out_views, out_mask = apply(Transform(hflip=True), views, mask)
    np.testing.assert_array_equal(out_views, views[..., ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])


def test_shift_moves_content_down_right_and_fills_zeros():
    views = np.zeros((H, W), np.uint16)
    views[100, 100] = 7
    views[:, :5] = 3  # leaves the image on a shift to the left
    out, _ = apply(Transform(shift_px=(3, -5)), views)
    assert out[103, 95] == 7
    assert out.sum() == 7
    assert (out[:, -5:] == 0).all()


def test_rotation_preserves_total_counts_of_a_centred_object():
    rows, cols = np.mgrid[:H, :W]
    blob = 5000 * np.exp(-(((rows - 127.5) / 30) ** 2 + ((cols - 127.5) / 18) ** 2))
    views = np.rint(blob).astype(np.uint16)
    out, _ = apply(Transform(angle_deg=15.0), views)
    total = views.sum(dtype=np.int64)
    assert abs(out.sum(dtype=np.int64) - total) / total < 0.01
    assert not np.array_equal(out, views)


@pytest.mark.parametrize("angle", [15.0, -7.5])
def test_rotation_agrees_with_skimage(angle):
    views = np.random.default_rng(3).integers(0, 4000, size=(H, W)).astype(np.uint16)
    out, _ = apply(Transform(angle_deg=angle), views)
    reference = rotate(views.astype(np.float64), angle, order=1, mode="constant", preserve_range=True)
    assert np.abs(out.astype(np.float64) - reference).max() <= 0.5 + 1e-3  # ours is rounded, from float32


@pytest.mark.parametrize("dtype", [np.uint8, bool])
def test_mask_keeps_dtype_and_stays_binary(dtype):
    _, mask = _square_scan(np.random.default_rng(4))
    views = np.zeros((H, W), np.uint16)
    _, out = apply(TRANSFORMS["all"], views, mask.astype(dtype))
    assert out.dtype == np.dtype(dtype)
    assert set(np.unique(out.astype(np.uint8))) == {0, 1}


def test_unlabeled_and_one_view_scans():
    views, _ = _square_scan(np.random.default_rng(5), views=1)
    out, mask = apply(TRANSFORMS["rot"], views[0])
    assert out.shape == (H, W) and mask is None


def test_apply_rejects_bad_input():
    with pytest.raises(ValueError, match="uint16"):
        apply(Transform(hflip=True), np.zeros((2, H, W), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        apply(Transform(hflip=True), np.zeros((2, H, W), np.uint16), np.zeros((H, W + 1), np.uint8))


def test_random_transform_is_seeded_bounded_and_never_identity():
    draws = [random_transform(np.random.default_rng(11)) for _ in range(2)]
    assert draws[0] == draws[1]
    many = [random_transform(rng) for rng in [np.random.default_rng(12)] for _ in range(300)]
    assert all(t.name != "identity" for t in many)
    assert not any(t.vflip for t in many)  # off by default: see P_VFLIP
    assert all(abs(t.angle_deg) <= 15 and max(map(abs, t.shift_px)) <= 16 for t in many)
    names = {t.name for t in many}
    assert {"hflip", "rot", "shift", "hflip+rot+shift"} <= names
    assert len({t for t in many}) > 250  # not a handful of repeated transforms


def test_distinct_transforms_never_repeat():
    # 40 independent draws would repeat plain "hflip" (p ~ 1/7 each) almost surely.
    transforms = distinct_transforms(np.random.default_rng(14), 40)
    assert len(transforms) == len(set(transforms)) == 40
    assert distinct_transforms(np.random.default_rng(14), 40) == transforms
    with pytest.raises(ValueError, match="distinct"):  # only hflip is possible here
        distinct_transforms(np.random.default_rng(14), 2, max_angle_deg=0, max_shift_px=0)


def test_copy_transforms_depend_on_scan_and_seed_only():
    from bonescan_platform.augment import augmented_scan_key, copy_transforms

    assert copy_transforms("scan0", 7, 5) == copy_transforms("scan0", 7, 5)
    assert copy_transforms("scan0", 7, 3) == copy_transforms("scan0", 7, 5)[:3]  # K does not reshuffle
    assert copy_transforms("scan0", 8, 5) != copy_transforms("scan0", 7, 5)
    assert copy_transforms("scan1", 7, 5) != copy_transforms("scan0", 7, 5)
    keys = {augmented_scan_key(scan, seed, copy) for scan in ("a", "b") for seed in (0, 1) for copy in (1, 2)}
    assert len(keys) == 8 and all(len(k) == 64 for k in keys)


def test_transform_name_lists_ops_in_order():
    assert Transform(hflip=True, angle_deg=3.0, shift_px=(0, 2)).name == "hflip+rot+shift"
    assert Transform(vflip=True).name == "vflip"
    assert Transform().name == "identity"


@pytest.mark.parametrize("batch", [1, 4])
def test_augment_batch_shapes_dtypes_and_determinism(batch):
    rng = np.random.default_rng(6)
    pairs = [_square_scan(rng) for _ in range(batch)]
    images = np.stack([v for v, _ in pairs]).astype(np.float32) / 1000  # (B, 2, H, W)
    masks = np.stack([m for _, m in pairs])[:, None].astype(np.float32)  # (B, 1, H, W)
    before = images.copy()
    out_images, out_masks = augment_batch(images, masks, np.random.default_rng(7))
    again = augment_batch(images, masks, np.random.default_rng(7))
    assert out_images.shape == images.shape and out_images.dtype == np.float32
    assert out_masks.shape == masks.shape and out_masks.dtype == np.float32
    assert set(np.unique(out_masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(images, before)
    np.testing.assert_array_equal(out_images, again[0])
    np.testing.assert_array_equal(out_masks, again[1])
    for image, mask in zip(out_images, out_masks):
        assert _iou(image[0] > 0.5, mask[0] == 1) > 0.9


def test_augment_batch_draws_a_transform_per_sample():
    views, mask = _square_scan(np.random.default_rng(8))
    images = np.repeat(views[None].astype(np.float32), 8, axis=0)  # (8, 2, H, W), all equal
    masks = np.repeat(mask[None, None].astype(np.float32), 8, axis=0)
    out, _ = augment_batch(images, masks, np.random.default_rng(9))
    # One transform for the whole batch would give 1; plain "hflip" may come up twice.
    assert len({o.tobytes() for o in out}) >= 6


# --- bonescan augment on Ray -----------------------------------------------------------------


def _write_shard_dir(path, rng):
    """5 scans: 3 train (one unlabeled, one ANT only), 2 test. Returns {scan_key: row}."""
    rows = []
    for i in range(5):
        views, mask = _square_scan(rng, top_left=tuple(rng.integers(40, 190, size=2)))
        rows.append(
            {
                "patient_key": f"patient{i // 2}",
                "scan_key": f"scan{i}",
                "ant": shards.encode_image(views[0], "<u2"),
                "post": None if i == 2 else shards.encode_image(views[1], "<u2"),
                "mask": None if i == 1 else shards.encode_image(mask, "u1"),
                "crop_box": [100 + i, 0, 256, 256],
                "pixel_spacing_mm": 2.26,
                "readers_agree": None if i == 1 else True,
                "source": "synthetic",
                "split": "train" if i < 3 else "test",
                "views": "ANT" if i == 2 else "ANT+POST",
            }
        )
    path.mkdir()
    infos = [
        shards.write_shard([r for r in rows if r["split"] == split], path / f"{split}-00000.parquet")
        for split in ("train", "test")
    ]
    shards.write_manifest(path, infos, {"job": "test"})
    return {r["scan_key"]: r for r in _read_rows(path)}  # as stored (float32 spacing)


def _read_rows(shard_dir):
    return [row for path in shards.shard_paths(shard_dir) for row in pq.read_table(path).to_pylist()]


@pytest.mark.ray
def test_augment_job_end_to_end(ray_local, tmp_path):
    from bonescan_platform.augment import augment

    data, out = tmp_path / "d1", tmp_path / "d2"
    originals = _write_shard_dir(data, np.random.default_rng(10))

    assert augment(data, out, copies=2, seed=7, rows_per_shard=4) == 0
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["report"]["rows_in"] == 5 and manifest["report"]["rows_out"] == 15
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(s["file"] for s in manifest["shards"])
    rows = _read_rows(out)
    assert len(rows) == 15
    assert len({r["scan_key"] for r in rows}) == 15

    copies = [r for r in rows if r["scan_key"] not in originals]
    for row in rows:
        if row["scan_key"] in originals:
            assert row == originals[row["scan_key"]]  # kept unchanged
    assert len(copies) == 10
    assert len({c["ant"] for c in copies}) == 10  # no two copies of a scan alike
    by_patient_split = {(r["patient_key"], r["split"]) for r in originals.values()}
    for copy in copies:
        assert copy["source"].startswith("augmented:") and copy["source"] != "augmented:identity"
        assert (copy["patient_key"], copy["split"]) in by_patient_split
        # Which original? The one with the same crop box (unique per scan in this fixture).
        (original,) = [o for o in originals.values() if o["crop_box"] == copy["crop_box"]]
        for column in ("patient_key", "split", "pixel_spacing_mm", "readers_agree", "views"):
            assert copy[column] == original[column]
        assert (copy["post"] is None) == (original["post"] is None)
        assert (copy["mask"] is None) == (original["mask"] is None)
        assert copy["ant"] != original["ant"]
        if copy["mask"] is not None:
            mask = shards.decode_image(copy["mask"], "u1")
            assert set(np.unique(mask)) <= {0, 1}
            for view in ("ant", "post"):
                if copy[view] is not None:
                    assert _iou(shards.decode_image(copy[view], "<u2") > 500, mask == 1) > 0.9

    # Rerun: byte-identical shards. Then fewer, larger shards: the old extra files go.
    assert augment(data, out, copies=2, seed=7, rows_per_shard=4) == 0
    assert json.loads((out / shards.MANIFEST).read_text())["shards"] == manifest["shards"]
    (out / "notes.parquet").write_bytes(b"a file of someone else's, which no manifest listed")
    assert augment(data, out, copies=2, seed=7) == 0
    rerun = json.loads((out / shards.MANIFEST).read_text())
    assert (out / "notes.parquet").read_bytes().startswith(b"a file of someone else's")  # never deleted
    (out / "notes.parquet").unlink()
    assert sorted(p.name for p in out.glob("*.parquet")) == ["test-00000.parquet", "train-00000.parquet"]
    assert [s["file"] for s in rerun["shards"]] == ["test-00000.parquet", "train-00000.parquet"]
    assert sorted(map(repr, _read_rows(out))) == sorted(map(repr, rows))


def test_bad_input_is_refused_before_ray_starts(tmp_path):
    from bonescan_platform.augment import augment

    with pytest.raises(InputError, match="no shard manifest"):
        augment(tmp_path / "nothing", tmp_path / "out")
    data = tmp_path / "d1"
    _write_shard_dir(data, np.random.default_rng(13))
    with pytest.raises(InputError, match="copies"):
        augment(data, tmp_path / "out", copies=-1)
    with pytest.raises(InputError, match="must differ"):
        augment(data, data)
    with pytest.raises(InputError, match="--samples"):
        augment(data, tmp_path / "out", dcgan=True)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.parquet").write_bytes(b"not ours")
    with pytest.raises(InputError, match="not a shard folder"):
        augment(data, foreign)
    assert (foreign / "keep.parquet").exists()
    (data / "train-00000.parquet").write_bytes(b"garbage")
    with pytest.raises(InputError, match="train-00000.parquet: its content is not what the shard manifest"):
        augment(data, tmp_path / "out")


def test_cli_augment(tmp_path, capsys):
    from bonescan_platform.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["augment", "--help"])
    assert exit_.value.code == 0
    assert "--copies" in capsys.readouterr().out
    assert main(["augment", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--copies", "2"]) == 2
    assert "no shard manifest" in capsys.readouterr().err
