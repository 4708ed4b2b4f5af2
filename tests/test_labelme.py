import json

import numpy as np
import pytest

from bonescan_model.contours import mask_to_polygons
from bonescan_model.errors import InputError
from bonescan_model.io.labelme import (
    LabelMeAnnotation,
    delta_a,
    rasterize,
    read_labelme,
    readers_ground_truth,
    write_labelme,
)


def _square(shape, row0, col0, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[row0:row0 + size, col0:col0 + size] = True
    return mask


def _document(**overrides) -> dict:
    doc = {
        "version": "5.4.1",
        "flags": {},
        "shapes": [{"label": "lesion", "points": [[4.0, 3.0], [9.0, 3.0], [9.0, 7.0]],
                    "group_id": None, "shape_type": "polygon", "flags": {}}],
        "imagePath": "scan0001_ANT.png",
        "imageData": None,
        "imageHeight": 32,
        "imageWidth": 16,
    }
    doc.update(overrides)
    return doc


def test_write_read_round_trip(tmp_path):
    mask = np.zeros((40, 24), dtype=bool)
    mask[5:9, 3:12] = True  # wider than tall: rows and cols cannot be confused
    mask[20:30, 15:18] = True
    polygons = mask_to_polygons(mask)  # closed: first point repeated
    path = tmp_path / "scan0001.json"
    write_labelme(path, polygons, (40, 24), "scan0001_ANT.png")

    doc = json.loads(path.read_text())
    assert doc["imageHeight"] == 40 and doc["imageWidth"] == 24 and doc["imageData"] is None
    assert doc["version"].startswith("5.") and doc["flags"] == {}
    assert [s["shape_type"] for s in doc["shapes"]] == ["polygon", "polygon"]
    assert all(s["label"] == "lesion" and s["group_id"] is None for s in doc["shapes"])
    xy = np.array(doc["shapes"][0]["points"])
    assert xy[:, 0].max() - xy[:, 0].min() > xy[:, 1].max() - xy[:, 1].min()  # x is the column

    annotation = read_labelme(path)
    assert annotation.image_shape == (40, 24)
    assert annotation.image_path == "scan0001_ANT.png"
    assert len(annotation.polygons) == 2
    for written, read in zip(polygons, annotation.polygons):
        np.testing.assert_allclose(read, written[:-1])  # the closing point is implicit
    np.testing.assert_array_equal(rasterize(annotation, (40, 24)), mask)


def test_file_without_shapes_is_an_empty_label(tmp_path):
    path = tmp_path / "scan0002.json"
    write_labelme(path, [], (1024, 256), "scan0002_ANT.png")
    annotation = read_labelme(path)
    assert annotation.polygons == [] and annotation.image_shape == (1024, 256)
    assert not rasterize(annotation, (1024, 256)).any()


def test_rasterize_known_square():
    # A reader outlining pixels rows 3-6, cols 4-8 clicks the corners between pixel centres.
    square = np.array([[2.5, 3.5], [2.5, 8.5], [6.5, 8.5], [6.5, 3.5]])
    annotation = LabelMeAnnotation(polygons=[square], image_shape=(12, 12), image_path="")
    expected = np.zeros((12, 12), dtype=bool)
    expected[3:7, 4:9] = True
    np.testing.assert_array_equal(rasterize(annotation, (12, 12)), expected)


def test_rasterize_refuses_another_image_shape():
    annotation = LabelMeAnnotation(polygons=[], image_shape=(256, 256), image_path="crop.png")
    with pytest.raises(ValueError, match="256x256"):
        rasterize(annotation, (1024, 256))


_BAD = {
    "invalid JSON": ("{not json", "invalid JSON"),
    "not an object": (json.dumps([1, 2]), "not a LabelMe object"),
    "missing imageHeight": (json.dumps({k: v for k, v in _document().items() if k != "imageHeight"}),
                            "missing imageHeight"),
    "missing imageWidth": (json.dumps({k: v for k, v in _document().items() if k != "imageWidth"}),
                           "missing imageWidth"),
    "zero imageWidth": (json.dumps(_document(imageWidth=0)), "imageWidth must be a positive integer"),
    "missing shapes": (json.dumps({k: v for k, v in _document().items() if k != "shapes"}), "missing shapes"),
    "rectangle": (json.dumps(_document(shapes=[{"label": "lesion", "points": [[1, 1], [5, 5]],
                                                 "shape_type": "rectangle"}])),
                  "unsupported shape_type 'rectangle'"),
    "two points": (json.dumps(_document(shapes=[{"label": "lesion", "points": [[1, 1], [5, 5]],
                                                  "shape_type": "polygon"}])),
                   "2 distinct points"),
    "closed triangle of two points": (
        json.dumps(_document(shapes=[{"label": "lesion", "points": [[1, 1], [5, 5], [1, 1]],
                                      "shape_type": "polygon"}])),
        "2 distinct points"),
    "NaN point": ('{"imageHeight": 32, "imageWidth": 16, "shapes": [{"label": "lesion", '
                  '"points": [[1, 1], [NaN, 5], [3, 9]], "shape_type": "polygon"}]}',
                  "NaN or infinite"),
    "non-numeric point": (json.dumps(_document(shapes=[{"label": "lesion", "points": [[1, 1], ["a", 5], [3, 9]],
                                                         "shape_type": "polygon"}])),
                          "numeric [x, y] pairs"),
    "point outside": (json.dumps(_document(shapes=[{"label": "lesion", "points": [[1, 1], [20, 5], [3, 9]],
                                                     "shape_type": "polygon"}])),
                      "outside the 32x16 image"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_input_names_file_and_reason(tmp_path, case):
    text, reason = _BAD[case]
    path = tmp_path / "reader2" / "scan0007.json"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_labelme(path)
    message = str(err.value)
    assert message.startswith(str(path) + ": ")
    assert reason in message
    assert "\n" not in message
    assert err.value.path == str(path)


def test_unreadable_file_names_file(tmp_path):
    for path in (tmp_path / "missing.json", tmp_path):  # absent; a directory
        with pytest.raises(InputError, match="cannot read") as err:
            read_labelme(path)
        assert err.value.path == str(path)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="cannot read"):
        read_labelme(binary)


def test_points_on_the_image_edge_are_accepted(tmp_path):
    # LabelMe's canvas runs to x = W; contours of border lesions run along -0.5.
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(_document(shapes=[{"label": "lesion", "points": [[-0.5, 0], [16, 0], [16, 32]],
                                                   "shape_type": "polygon"}])))
    assert len(read_labelme(path).polygons) == 1


def test_identical_readers_agree_and_the_first_is_ground_truth():
    lesion = _square((64, 64), 10, 10, 8)
    truth, agree = readers_ground_truth([lesion, lesion.copy(), lesion.copy()])
    assert agree and truth is not None
    np.testing.assert_array_equal(truth, lesion)


def test_slightly_different_outline_agrees_and_first_reader_is_taken():
    first = _square((64, 64), 10, 10, 40)
    wider = first.copy()
    wider[10:50, 50] = True  # one column more on a 40x40 lesion: DeltaA = 40/1640 = 0.024
    assert delta_a(first, wider) == pytest.approx(40 / 1640)
    truth, agree = readers_ground_truth([first, wider, first])
    assert agree
    np.testing.assert_array_equal(truth, first)


def test_shifted_small_lesion_disagrees():
    # A one-pixel shift of a 10x10 lesion: IoU = 90/110, DeltaA = 0.18.
    a = _square((64, 64), 10, 10, 10)
    b = _square((64, 64), 10, 11, 10)
    assert readers_ground_truth([a, a, b]) == (None, False)


def test_missed_lesion_disagrees():
    both = _square((64, 64), 5, 5, 6) | _square((64, 64), 40, 40, 6)
    one = _square((64, 64), 5, 5, 6)
    truth, agree = readers_ground_truth([both, both, one])
    assert truth is None and not agree


def test_threshold_is_inclusive():
    a = np.zeros((10, 10), dtype=bool)
    a.flat[:100] = True
    b = a.copy()
    b.flat[:5] = False  # IoU 95/100: DeltaA exactly 0.05
    assert readers_ground_truth([a, b])[1]
    assert not readers_ground_truth([a, b], threshold=0.04)[1]


def test_empty_masks_agree_single_reader_agrees():
    empty = np.zeros((16, 16), dtype=bool)
    truth, agree = readers_ground_truth([empty, empty, empty])
    assert agree and not truth.any()
    lesion = _square((16, 16), 2, 2, 3)
    assert readers_ground_truth([empty, lesion]) == (None, False)
    truth, agree = readers_ground_truth([lesion])
    assert agree
    np.testing.assert_array_equal(truth, lesion)


def test_ground_truth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        readers_ground_truth([])
    with pytest.raises(ValueError, match="differ in shape"):
        readers_ground_truth([np.zeros((4, 4), bool), np.zeros((4, 5), bool)])
