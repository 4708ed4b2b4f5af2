import numpy as np
import pytest
from scipy import ndimage
from skimage import filters, measure

from bonescan_model.contours import mask_to_polygons, polygons_to_mask


def _random_lesions(seed: int, shape=(64, 64)) -> np.ndarray:
    """Irregular blobs: thresholded smooth noise, several per image, some on the border."""
    rng = np.random.default_rng(seed)
    smooth = filters.gaussian(rng.random(shape), sigma=rng.uniform(2.0, 3.5))
    return smooth > np.quantile(smooth, rng.uniform(0.8, 0.9))


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_keeps_every_lesion(seed):
    mask = _random_lesions(seed)
    labels, n = measure.label(mask, connectivity=2, return_num=True)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == n >= 3
    border = np.zeros_like(mask)
    border[[0, -1], :] = border[:, [0, -1]] = True
    assert any((labels[border] == i).any() for i in range(1, n + 1))  # the case is exercised
    for i, polygon in enumerate(polygons, start=1):
        assert polygon.ndim == 2 and polygon.shape[1] == 2 and polygon.dtype == np.float64
        np.testing.assert_array_equal(polygon[0], polygon[-1])
        lesion = ndimage.binary_fill_holes(labels == i)  # outer boundary only
        back = polygons_to_mask([polygon], mask.shape)
        if lesion.sum() >= 20:
            assert (back & lesion).sum() / (back | lesion).sum() >= 0.95
        # At the default tolerance no pixel centre crosses the curve: the round trip is exact.
        np.testing.assert_array_equal(back, lesion)


@pytest.mark.parametrize("tolerance", [0.0, 0.4])
def test_round_trip_iou_at_other_tolerances(tolerance):
    mask = _random_lesions(7)
    labels = measure.label(mask, connectivity=2)
    for i, polygon in enumerate(mask_to_polygons(mask, tolerance), start=1):
        lesion = ndimage.binary_fill_holes(labels == i)
        back = polygons_to_mask([polygon], mask.shape)
        if lesion.sum() >= 20:
            assert (back & lesion).sum() / (back | lesion).sum() >= 0.95


def test_empty_mask_gives_no_polygon():
    assert mask_to_polygons(np.zeros((16, 16), bool)) == []
    assert not polygons_to_mask([], (16, 16)).any()


def test_diagonal_pixels_are_one_lesion():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 1
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)


def test_vertices_are_row_col():
    mask = np.zeros((10, 12), bool)
    mask[2:4, 5:9] = True  # 2 rows tall, 4 columns wide
    (polygon,) = mask_to_polygons(mask)
    assert polygon[:, 0].min() == pytest.approx(1.5) and polygon[:, 0].max() == pytest.approx(3.5)
    assert polygon[:, 1].min() == pytest.approx(4.5) and polygon[:, 1].max() == pytest.approx(8.5)


def test_border_lesion_closes_on_the_image_edge():
    mask = np.zeros((8, 8), bool)
    mask[:, :3] = True  # touches three borders
    (polygon,) = mask_to_polygons(mask)
    np.testing.assert_array_equal(polygon[0], polygon[-1])
    assert polygon.min() == pytest.approx(-0.5) and polygon[:, 0].max() == pytest.approx(7.5)
    np.testing.assert_array_equal(polygons_to_mask([polygon], mask.shape), mask)


def test_holes_are_filled_and_islands_kept():
    mask = np.zeros((11, 11), bool)
    mask[1:10, 1:10] = True
    mask[3:8, 3:8] = False  # a hole
    mask[5, 5] = True  # an island inside it
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    back = polygons_to_mask(polygons, mask.shape)
    np.testing.assert_array_equal(back, ndimage.binary_fill_holes(mask))
    island = np.zeros_like(mask)
    island[5, 5] = True
    np.testing.assert_array_equal(polygons_to_mask(polygons[1:], mask.shape), island)


def test_single_pixel_survives_large_tolerance():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    for tolerance in (0.25, 0.5, 3.0):
        (polygon,) = mask_to_polygons(mask, tolerance)
        assert len(polygon) >= 4
        np.testing.assert_array_equal(polygons_to_mask([polygon], mask.shape), mask)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="bool"):
        mask_to_polygons(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="bool"):
        mask_to_polygons(np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="tolerance"):
        mask_to_polygons(np.zeros((4, 4), bool), -1.0)
    with pytest.raises(ValueError, match="polygon"):
        polygons_to_mask([np.zeros((2, 2))], (4, 4))
