"""Thoracic crop: the real GE whole-body scan and simple body phantoms of different heights."""

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from skimage import io
from skimage.draw import ellipse, rectangle_perimeter

from bonescan_model.io.dicom import read_scan
from bonescan_model.preprocess import crop, mirror, thoracic_crop_box

OUTPUT = Path(__file__).parent / "_output"


def phantom(head_top: float, scale: float = 1.0, seed: int = 0, hot_spots: bool = True,
            arms: bool = True) -> tuple[np.ndarray, int, int]:
    """A whole-body ANT image (1024, 256) of Poisson counts drawn from ellipses and boxes.

    Returns (counts, neck_top, trunk_top): the rows where the neck and the shoulders begin.
    scale 1 is an adult of about 1.8 m at 2.26 mm/px; hot spots are a bladder and an
    injection site in the arm, each far brighter than bone.
    """
    shape = (1024, 256)
    mean = np.full(shape, 0.5)  # background counts
    centre, s = 128, scale

    def blob(r, c, half_rows, half_cols, value):
        rows, cols = ellipse(r, c, half_rows, half_cols, shape=shape)
        mean[rows, cols] = np.maximum(mean[rows, cols], value)

    def box(r0, c0, r1, c1, value):
        r0, r1 = int(np.clip(r0, 0, shape[0])), int(np.clip(r1, 0, shape[0]))
        mean[r0:r1, int(c0):int(c1)] = np.maximum(mean[r0:r1, int(c0):int(c1)], value)

    neck_top, trunk_top = head_top + 85 * s, head_top + 105 * s
    blob(head_top + 45 * s, centre, 45 * s, 32 * s, 25)  # skull
    box(neck_top, centre - 14 * s, trunk_top + 10 * s, centre + 14 * s, 15)
    blob(trunk_top + 30 * s, centre, 30 * s, 72 * s, 15)  # shoulders
    box(trunk_top + 25 * s, centre - 60 * s, trunk_top + 330 * s, centre + 60 * s, 15)
    box(trunk_top, centre - 3 * s, trunk_top + 330 * s, centre + 3 * s, 45)  # spine
    for side in (-1, 1):
        if arms:
            a0, a1 = sorted((centre + side * 66 * s, centre + side * 88 * s))
            box(trunk_top + 15 * s, a0, trunk_top + 330 * s, a1, 12)
        l0, l1 = sorted((centre + side * 8 * s, centre + side * 52 * s))
        box(trunk_top + 330 * s, l0, trunk_top + 730 * s, l1, 12)  # legs, cut off if tall
    if hot_spots:
        blob(trunk_top + 300 * s, centre, 14 * s, 22 * s, 900)  # bladder
        blob(trunk_top + 200 * s, centre + 77 * s, 4, 4, 3000)  # injection site
    counts = np.random.default_rng(seed).poisson(mean).astype(np.uint16)
    return counts, int(round(neck_top)), int(round(trunk_top))


def _to_png(image: np.ndarray) -> np.ndarray:
    """(H, W) counts -> (H, W, 3) uint8 for a person to look at."""
    grey = np.clip(image / max(np.percentile(image, 99.5), 1), 0, 1)
    return (np.repeat(grey[..., None], 3, axis=-1) * 255).astype(np.uint8)


def test_ge_scan_crop_holds_the_thorax():
    scan = read_scan([get_testdata_file("JPEG2000.dcm")], b"k" * 32)
    row0, col0, rows, cols = box = thoracic_crop_box(scan.ant)
    assert (rows, cols) == (256, 256) and col0 == 0
    assert 0 <= row0 <= 1024 - 256
    # Read off the image by eye: the head runs from row ~85 to the neck at ~175, the shoulders
    # widen from ~185 to ~205 and the bladder sits at ~410-430. The box must start between the
    # neck and the shoulders, so that clavicles and scapulae are at its top.
    assert 175 <= row0 <= 200
    thorax = crop(scan.ant, box)
    assert thorax.shape == (256, 256) and thorax.dtype == np.uint16
    # The thorax is the busiest part of the crop: its upper half holds more counts than its
    # lower half (abdomen and the bladder's top).
    assert thorax[:128].sum() > thorax[128:].sum()

    OUTPUT.mkdir(exist_ok=True)
    whole = _to_png(scan.ant.astype(np.float32))
    rr, cc = rectangle_perimeter((row0, col0), extent=(rows, cols), shape=whole.shape[:2])
    whole[rr, cc] = (255, 0, 0)
    io.imsave(OUTPUT / "crop_ge_whole_body.png", np.repeat(np.repeat(whole, 2, 0), 2, 1),
              check_contrast=False)
    io.imsave(OUTPUT / "crop_ge_thorax.png",
              np.repeat(np.repeat(_to_png(thorax.astype(np.float32)), 2, 0), 2, 1),
              check_contrast=False)


@pytest.mark.parametrize("head_top, scale", [(10, 1.0), (40, 1.0), (90, 1.1), (150, 0.9),
                                             (200, 1.2), (60, 0.6)])
def test_box_starts_at_the_trunk_below_the_neck(head_top, scale):
    image, neck_top, trunk_top = phantom(head_top, scale)
    row0, col0, rows, cols = thoracic_crop_box(image)
    assert (col0, rows, cols) == (0, 256, 256)
    # From below the top of the neck to above the clavicles (about 10 px below the shoulders'
    # top at scale 1), and down past the lowest ribs (about 190 px below it).
    assert neck_top <= row0 <= trunk_top + 10 * scale
    assert row0 + rows >= trunk_top + 190 * scale


@pytest.mark.parametrize("seed", range(4))
def test_box_follows_the_patient_not_the_noise(seed):
    reference = thoracic_crop_box(phantom(80, seed=100)[0])[0]
    image, _, _ = phantom(80, seed=seed)
    assert abs(thoracic_crop_box(image)[0] - reference) <= 2
    # The same patient lying 70 rows further down the table.
    shifted, _, _ = phantom(150, seed=seed)
    assert abs(thoracic_crop_box(shifted)[0] - (reference + 70)) <= 2


def test_hot_spots_and_arms_do_not_move_the_box():
    reference = thoracic_crop_box(phantom(80, hot_spots=False)[0])[0]
    assert abs(thoracic_crop_box(phantom(80, hot_spots=True)[0])[0] - reference) <= 2
    assert abs(thoracic_crop_box(phantom(80, arms=False)[0])[0] - reference) <= 3


def test_post_view_agrees_with_ant():
    ant, _, _ = phantom(80, seed=1)
    post = mirror(phantom(80, seed=2)[0])  # the POST camera's image, mirrored into ANT
    assert abs(thoracic_crop_box(ant, post)[0] - thoracic_crop_box(ant)[0]) <= 2


def test_scan_without_a_head_crops_from_the_top():
    image, _, trunk_top = phantom(-110)  # cut at the shoulders
    assert trunk_top < 0
    assert thoracic_crop_box(image)[0] <= 10


def test_empty_image_is_an_error():
    with pytest.raises(ValueError, match="no body"):
        thoracic_crop_box(np.zeros((1024, 256), np.uint16))


def test_crop_slices_inside_and_pads_outside():
    image = np.arange(12 * 8, dtype=np.uint16).reshape(12, 8)
    np.testing.assert_array_equal(crop(image, (2, 1, 4, 3)), image[2:6, 1:4])
    out = crop(image, (-2, 6, 4, 4))
    assert out.shape == (4, 4) and out.dtype == np.uint16
    np.testing.assert_array_equal(out[2:, :2], image[:2, 6:])
    assert out[:2].sum() == 0 and out[:, 2:].sum() == 0
    stacked = np.stack([image, image + 1])  # (2, H, W): ANT and POST crop together
    np.testing.assert_array_equal(crop(stacked, (0, 0, 5, 5))[1], image[:5, :5] + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_box_holds_the_thorax_of_every_synthetic_patient(seed):
    from bonescan_model.synth import synth_patient

    for index in range(12):
        patient = synth_patient(seed, index)
        row0, col0, rows, cols = thoracic_crop_box(patient.ant)
        t_row0, t_col0, t_rows, t_cols = patient.thorax_box
        assert row0 <= t_row0 and t_row0 + t_rows <= row0 + rows, (seed, index)
        assert col0 <= t_col0 and t_col0 + t_cols <= col0 + cols, (seed, index)
