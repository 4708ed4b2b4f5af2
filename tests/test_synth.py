import json

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID
from scipy import ndimage
from skimage import io as skio, morphology

from bonescan_model.io.dicom import group_series, read_scan, scan_name
from bonescan_model.io.labelme import delta_a, rasterize, read_labelme, readers_ground_truth
from bonescan_model.preprocess import crop, mirror, thoracic_crop_box
from bonescan_model.synth import (
    LESION_SITE_WEIGHTS,
    READERS,
    synth_patient,
    write_cohort,
)

SECRET = b"test-site-secret-0123456789"
COHORT_PATIENTS = 40


@pytest.fixture(scope="module")
def patients():
    return [synth_patient(0, i) for i in range(12)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = write_cohort(out, COHORT_PATIENTS, seed=0)
    truths = [json.loads((out / "truth" / f"scan{i:04d}.json").read_text()) for i in range(COHORT_PATIENTS)]
    return summary, out, truths


def _lesion_component(patient, lesion) -> np.ndarray:
    labels, _ = ndimage.label(patient.lesion_mask, structure=np.ones((3, 3)))
    return labels == labels[int(round(lesion.center_row)), int(round(lesion.center_col))]


def test_same_seed_and_index_give_the_same_patient():
    a, b = synth_patient(5, 3), synth_patient(5, 3)
    np.testing.assert_array_equal(a.ant, b.ant)
    np.testing.assert_array_equal(a.post, b.post)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert (a.lesions, a.hot_spots, a.thorax_box, a.identity) == (b.lesions, b.hot_spots, b.thorax_box, b.identity)


@pytest.mark.parametrize("seed, index", [(6, 3), (5, 4)])
def test_another_seed_or_index_gives_another_patient(seed, index):
    a, b = synth_patient(5, 3), synth_patient(seed, index)
    assert not np.array_equal(a.ant, b.ant)
    assert not np.array_equal(a.post, b.post)
    assert a.identity.patient_id != b.identity.patient_id
    assert a.identity.study_uid != b.identity.study_uid


def test_images_are_camera_counts(patients):
    for p in patients:
        for view in (p.ant, p.post):
            assert view.shape == (1024, 256) and view.dtype == np.uint16
            assert 1_000_000 <= int(view.sum(dtype=np.int64)) <= 4_000_000
        assert p.lesion_mask.shape == (1024, 256) and p.lesion_mask.dtype == bool
        with pytest.raises(ValueError):
            p.ant[0, 0] = 1  # frozen: arrays are read-only


def test_patients_vary_in_size_and_position(patients):
    tops = [p.thorax_box[0] for p in patients]
    heights = [p.thorax_box[2] for p in patients]
    assert max(tops) - min(tops) > 60
    assert max(heights) - min(heights) > 15


def test_identity_is_fake_realistic_and_unique(patients):
    ids = [p.identity for p in patients]
    assert len({i.patient_id for i in ids}) == len({i.study_uid for i in ids}) == len(ids)
    for i in ids:
        assert i.patient_name.startswith("SYNTH^") and i.patient_id.startswith("SP-")
        assert UID(i.study_uid).is_valid and UID(i.series_uid).is_valid and i.study_uid != i.series_uid
        assert len(i.birth_date) == len(i.study_date) == 8 and i.birth_date < i.study_date


def test_lesions_sit_on_thoracic_bone_at_stated_sizes(patients):
    counts = [len(p.lesions) for p in patients]
    assert 0 in counts and max(counts) >= 2
    for p in patients:
        row0, col0, rows, cols = p.thorax_box
        assert p.lesion_mask.any() == bool(p.lesions)
        for lesion in p.lesions:
            assert 2.0 <= lesion.diameter_mm <= 20.0
            assert 1.5 <= lesion.contrast <= 6.0
            assert lesion.bone in LESION_SITE_WEIGHTS
            assert row0 <= lesion.center_row < row0 + rows and col0 <= lesion.center_col < col0 + cols
            assert p.lesion_mask[int(round(lesion.center_row)), int(round(lesion.center_col))]
            # Pixel area at most that of the stated diameter stretched along the bone.
            radius_px = lesion.diameter_mm / 2 / 2.26
            assert _lesion_component(p, lesion).sum() <= np.pi * (1.6 * 1.45 * radius_px + 1) ** 2
        rr, cc = np.nonzero(p.lesion_mask)
        if rr.size:
            assert rr.min() >= row0 - 8 and rr.max() < row0 + rows + 8
            assert cc.min() >= col0 - 8 and cc.max() < col0 + cols + 8


def test_lesions_stand_out_in_both_views(patients):
    """Large, high-contrast lesions are brighter than their surroundings in ANT and in the
    mirrored POST: both views carry the lesion, at the lesion mask's place."""
    checked = 0
    for p in patients:
        post = mirror(p.post)
        for lesion in p.lesions:
            if lesion.diameter_mm < 8 or lesion.contrast < 3:
                continue
            inside = _lesion_component(p, lesion)
            ring = morphology.dilation(inside, morphology.disk(6)) & ~morphology.dilation(inside, morphology.disk(3))
            for view in (p.ant, post):
                assert view[inside].mean() > 1.15 * view[ring].mean()
            checked += 1
    assert checked >= 3


def test_benign_hot_spots_outshine_lesions(patients):
    """Counts alone do not find lesions: non-lesion pixels, inside the thorax too, are often
    brighter than the lesions' median."""
    with_lesions = in_thorax = 0
    for p in patients:
        assert p.hot_spots
        if not p.lesions:
            continue
        with_lesions += 1
        away = ~morphology.dilation(p.lesion_mask, morphology.disk(3))
        row0, col0, rows, cols = p.thorax_box
        thorax = np.zeros_like(away)
        thorax[row0:row0 + rows, col0:col0 + cols] = True
        brighter = []
        for view in (p.ant, mirror(p.post)):
            median = np.median(view[p.lesion_mask])
            assert (view[away] > median).any()
            brighter.append((view[away & thorax] > median).any())
        in_thorax += all(brighter)
    assert in_thorax >= with_lesions / 3
    kinds = {h.kind for p in patients for h in p.hot_spots}
    assert {"injection_site", "healed_rib_fracture", "degenerative_knee"} <= kinds


def test_post_is_recorded_from_behind(patients):
    """POST is in posterior orientation: the injection site (one arm) appears mirrored."""
    checked = 0
    for p in patients:
        for spot in p.hot_spots:
            if spot.kind != "injection_site":
                continue
            r, c = int(round(spot.center_row)), int(round(spot.center_col))
            mirrored = 255 - c
            assert abs(mirrored - c) > 20  # an arm, well off the midline
            near = p.post[r - 3:r + 4, mirrored - 3:mirrored + 4].max()
            same_side = p.post[r - 3:r + 4, c - 3:c + 4].max()
            assert near > 2 * same_side
            checked += 1
    assert checked >= 3


def test_cohort_dicom_reads_back_as_written(cohort):
    summary, out, truths = cohort
    groups, rejected = group_series(sorted((out / "dicom").iterdir()), SECRET)
    assert not rejected and len(groups) == COHORT_PATIENTS
    assert summary.dicom_files == len(list((out / "dicom").iterdir()))
    options = {(t["dicom"]["layout"], t["dicom"]["view_coding"]) for t in truths}
    assert len(options) == 6  # both layouts x all three view codings
    assert 0 < sum(t["dicom"]["compressed"] for t in truths) < COHORT_PATIENTS
    by_name = {scan_name(list(g.files)): g.files for g in groups}
    for index in range(8):  # every layout x coding pair and two compressed scans
        patient = synth_patient(0, index)
        scan = read_scan(by_name[patient.name], SECRET)
        assert scan.views == ("ANT", "POST")
        np.testing.assert_array_equal(scan.ant, patient.ant)
        np.testing.assert_array_equal(scan.post, mirror(patient.post))
        if truths[index]["dicom"]["compressed"]:
            ds = pydicom.dcmread(by_name[patient.name][0], stop_before_pixels=True)
            assert ds.file_meta.TransferSyntaxUID.is_compressed
        mask = skio.imread(out / "truth" / f"{patient.name}.mask.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, patient.lesion_mask)


def test_cohort_labels_give_the_recorded_agreement(cohort):
    summary, out, truths = cohort
    frames = set()
    for truth in truths:
        name = truth["scan"]
        annotations = [read_labelme(out / "labels" / r / f"{name}.json") for r in READERS]
        shapes = {a.image_shape for a in annotations}
        assert len(shapes) == 1
        shape = shapes.pop()
        masks = [rasterize(a, shape) for a in annotations]
        exact = skio.imread(out / "truth" / f"{name}.mask.png") > 0
        frames.add(truth["label_frame"])
        if truth["label_frame"] == "thoracic_crop":
            assert shape == (256, 256)
            # The crop box can be recomputed from the ANT image, as ingest will.
            ant = synth_patient(0, truth["index"]).ant
            assert tuple(truth["label_crop_box"]) == thoracic_crop_box(ant)
            exact = crop(exact, truth["label_crop_box"])
        else:
            assert shape == (1024, 256)
        ground_truth, agree = readers_ground_truth(masks)
        assert agree == truth["readers_agree"]
        if agree:
            assert delta_a(ground_truth, exact) <= 0.025 + 1e-12
            if not truth["lesions"]:
                assert all(a.polygons == [] for a in annotations)
        else:
            deviant = READERS.index(truth["disagreeing_readers"][0])
            others = [m for i, m in enumerate(masks) if i != deviant]
            assert readers_ground_truth(others)[1]
            assert all(delta_a(masks[deviant], m) > 0.05 for m in others)
    assert frames == {"whole_body", "thoracic_crop"}
    assert set(summary.crop_labeled_scans) == {t["scan"] for t in truths if t["label_frame"] == "thoracic_crop"}


def test_cohort_disagreement_rate_is_sensible(cohort):
    summary, _, truths = cohort
    disagreeing = [t for t in truths if not t["readers_agree"]]
    assert 0.05 <= len(disagreeing) / len(truths) <= 0.4
    assert len(summary.disagreeing_scans) == len(disagreeing)
    assert len({t["deviation"] for t in disagreeing}) >= 2


def test_cohort_has_patients_without_lesions(cohort):
    summary, _, truths = cohort
    assert 0 < summary.patients_with_lesions < COHORT_PATIENTS
    assert summary.lesions == sum(len(t["lesions"]) for t in truths)


def test_no_identity_in_file_names_or_label_files(cohort):
    _, out, _ = cohort
    secrets = set()
    for path in (out / "dicom").iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.PatientName)
        secrets |= {name, *name.split("^"), ds.PatientID, ds.PatientBirthDate, ds.StudyDate,
                    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    secrets = {s for s in secrets if len(s) >= 4}
    assert any(s.startswith("SP-") for s in secrets)  # the headers do carry an identity
    for path in out.rglob("*"):
        relative = str(path.relative_to(out))
        assert not any(s in relative for s in secrets), relative
        if path.suffix == ".json":
            text = path.read_text()
            assert not any(s in text for s in secrets), relative
