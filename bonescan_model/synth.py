"""The synthetic bone-scan cohort: the project's embedded default data.

A seeded phantom of a whole-body 99mTc-MDP bone scan (1024 rows x 256 cols, head at row 0,
2.26 mm pixels), ANT and POST, with thoracic metastases, benign hot spots that are not
lesions, and three readers' LabelMe labels that mostly agree. ``write_cohort`` writes it the
way a clinic has it (DICOM + LabelMe folders) plus the exact truth.

Anatomy is built in ANT orientation (image left = patient's right) from simple primitives:
rods (polylines with a radius: long bones, ribs, clavicles) and ellipsoids (vertebrae, skull,
organs), each drawn with its projected thickness sqrt(1 - (d/r)^2) and a per-view uptake,
because depth decides what a camera sees: the spine is brighter from behind, the sternum
from the front. The posterior uptake map is mirrored before writing, since POST is what the
camera records from behind. Lengths in the anatomy tables are "reference pixels" of a
760-pixel (172 cm) body and scale with each patient.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage
from skimage import draw, io as skio, morphology

from bonescan_model.contours import mask_to_polygons, polygons_to_mask
from bonescan_model.io.dicom import LAYOUTS, VIEW_CODINGS, PatientIdentity, write_whole_body
from bonescan_model.io.labelme import AGREEMENT_THRESHOLD, delta_a, write_labelme
from bonescan_model.preprocess import CROP_SIZE, thoracic_crop_box
from bonescan_model.progress import progress

ROWS, COLS = 1024, 256
PIXEL_SPACING_MM = 2.26
READERS = ("reader1", "reader2", "reader3")
_REF_HEIGHT_PX = 760.0  # the reference body the anatomy tables are written for (172 cm)

# Patient variation.
HEIGHT_CM = (150.0, 192.0)
WIDTH_FACTOR = (0.85, 1.2)
# Camera: a low-energy collimator's resolution; counts as in the real GE whole-body scan that
# pydicom ships (3.6 M per view, median body pixel about 23).
FWHM_MM = (7.0, 10.0)
COUNTS_PER_VIEW = (1.2e6, 3.8e6)  # kept inside 1-4 M with room for Poisson noise
# Metastases.
LESION_DIAMETER_MM = (2.0, 20.0)
LESION_CONTRAST = (1.5, 6.0)
P_NO_LESION = 0.25
MAX_LESIONS = 9
# Bone kinds a thoracic metastasis sits on, and how often (spine and ribs dominate).
LESION_SITE_WEIGHTS = {"spine": 0.38, "rib": 0.34, "sternum": 0.08, "scapula": 0.12, "clavicle": 0.08}
# The true skeleton (SyntheticPatient.bone_mask): bone uptake, ANT + POST, above this. Bones are
# drawn with a projected thickness that falls to 0 at their edge and peak uptakes of 0.1-1.6,
# so the level only trims the last sliver of an edge: from 0 to 0.1 the thorax's bone share
# moves from 38.7 % to 37.0 % (24 patients).
BONE_MASK_LEVEL = 0.02
# Readers.
P_READER_DISAGREES = 0.2
P_LABELS_ON_CROP = 0.4
# Readers who agree still click slightly different vertices: the spread (px) of each try.
AGREEING_JITTER_PX = (0.4, 0.25, 0.1)


@dataclass(frozen=True)
class Lesion:
    """One metastasis. center in ANT whole-body pixels (row, col); contrast: lesion uptake
    over the uptake of the bone it sits on (same in both views); bone: spine, rib, ..."""

    center_row: float
    center_col: float
    diameter_mm: float
    contrast: float
    bone: str


@dataclass(frozen=True)
class HotSpot:
    """A benign hot spot (not a lesion): kind, centre in ANT whole-body pixels."""

    kind: str
    center_row: float
    center_col: float


@dataclass(frozen=True, eq=False)
class SyntheticPatient:
    """One synthetic whole-body scan.

    ant, post: (1024, 256) uint16 counts as the camera records them (post in posterior
    orientation, not mirrored); lesion_mask: (1024, 256) bool, exact, in ANT coordinates;
    bone_mask: (1024, 256) bool, ANT coordinates, the true skeleton: where the phantom's bone
    uptake (both views, before lesions) exceeds BONE_MASK_LEVEL (what ``burden.skeleton_mask``
    is measured against);
    thorax_box: (row0, col0, rows, cols), clavicle tops to the lowest ribs, torso width;
    identity: fake but realistic headers, for the DICOM writer only.
    """

    name: str
    ant: np.ndarray = field(repr=False)
    post: np.ndarray = field(repr=False)
    lesion_mask: np.ndarray = field(repr=False)
    bone_mask: np.ndarray = field(repr=False)
    thorax_box: tuple[int, int, int, int]
    lesions: tuple[Lesion, ...]
    hot_spots: tuple[HotSpot, ...]
    fwhm_mm: float
    identity: PatientIdentity = field(repr=False)


@dataclass(frozen=True)
class CohortSummary:
    """What ``write_cohort`` wrote. Counts are over the whole cohort."""

    out_dir: Path
    patients: int
    seed: int
    dicom_files: int
    lesions: int
    patients_with_lesions: int
    disagreeing_scans: tuple[str, ...]
    crop_labeled_scans: tuple[str, ...]


# ---------------------------------------------------------------- primitives
# Each draws into maps (2, H, W) float: view 0 ANT, view 1 POST (posterior uptake, still in
# ANT orientation), adding uptake * projected thickness inside its own bounding box.


def _window(lo: np.ndarray, hi: np.ndarray):
    """Slices and pixel-centre grids of the image part of the box [lo, hi] (row, col)."""
    r0, c0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
    r1, c1 = min(int(np.ceil(hi[0])) + 1, ROWS), min(int(np.ceil(hi[1])) + 1, COLS)
    if r0 >= r1 or c0 >= c1:
        return None
    rr = np.arange(r0, r1, dtype=np.float64)[:, None]  # (h, 1)
    cc = np.arange(c0, c1, dtype=np.float64)[None, :]  # (1, w)
    return (slice(r0, r1), slice(c0, c1)), rr, cc


def _add(maps: np.ndarray, region, profile: np.ndarray, uptake: tuple[float, float]) -> None:
    maps[(slice(None), *region)] += np.asarray(uptake)[:, None, None] * profile[None]


def _rod_profile(points: np.ndarray, radius, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
    """Projected thickness of a round rod along the polyline ``points`` (K, 2); radius is a
    scalar or one value per vertex (tapering). Returns (h, w) in [0, 1]."""
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(points),))
    a, b = points[:-1], points[1:]  # (S, 2) segment ends
    ab = b - a
    length2 = np.maximum((ab**2).sum(1), 1e-9)[:, None, None]  # (S, 1, 1)
    dr, dc = rr[None] - a[:, 0, None, None], cc[None] - a[:, 1, None, None]  # (S, h, w)
    t = np.clip((dr * ab[:, 0, None, None] + dc * ab[:, 1, None, None]) / length2, 0.0, 1.0)
    d2 = (dr - t * ab[:, 0, None, None]) ** 2 + (dc - t * ab[:, 1, None, None]) ** 2
    r = radius[:-1, None, None] + t * (radius[1:] - radius[:-1])[:, None, None]
    q2 = (d2 / r**2).min(axis=0)
    return np.sqrt(np.clip(1.0 - q2, 0.0, 1.0))


def _rod(maps, points, radius, uptake) -> None:
    points = np.asarray(points, dtype=np.float64)
    rmax = float(np.max(radius))
    win = _window(points.min(0) - rmax - 1, points.max(0) + rmax + 1)
    if win is not None:
        region, rr, cc = win
        _add(maps, region, _rod_profile(points, radius, rr, cc), uptake)


def _ellipsoid(maps, center, radii, uptake, angle: float = 0.0, shell: float | None = None) -> None:
    """Projected thickness of an ellipsoid (radii (r_row, r_col), rotated by angle radians);
    shell: wall thickness as a fraction of the radius for a hollow one (the calvarium)."""
    center = np.asarray(center, dtype=np.float64)
    rmax = max(radii)
    win = _window(center - rmax - 1, center + rmax + 1)
    if win is None:
        return
    region, rr, cc = win
    dr, dc = rr - center[0], cc - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dr * cos + dc * sin) / radii[0], (-dr * sin + dc * cos) / radii[1]
    q2 = u**2 + v**2
    profile = np.sqrt(np.clip(1.0 - q2, 0.0, None))
    if shell is not None:
        profile -= np.sqrt(np.clip((1.0 - shell) ** 2 - q2, 0.0, None))
    _add(maps, region, profile, uptake)


def _bezier(p0, control, p1, n: int = 10) -> np.ndarray:
    """(n, 2) points of the quadratic Bezier curve p0 -> p1 pulled towards control."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(control) + t**2 * np.asarray(p1)


# ---------------------------------------------------------------- anatomy


class _Body:
    """One patient's placement: reference coordinates (y: fraction of body height from the
    head top, x: reference pixels from the midline, + = image right) -> image (row, col)."""

    def __init__(self, rng: np.random.Generator):
        self.height_px = rng.uniform(*HEIGHT_CM) * 10.0 / PIXEL_SPACING_MM
        self.scale = self.height_px / _REF_HEIGHT_PX
        # Broad and tall patients are narrowed so that their hands (108 reference pixels out)
        # stay on the 256-column detector.
        self.width = min(rng.uniform(*WIDTH_FACTOR), 124.0 / (108.0 * self.scale))
        self.top = rng.uniform(8.0, ROWS - 8.0 - self.height_px)
        half_span = 108.0 * self.scale * self.width
        slack = max(COLS / 2 - half_span - 4.0, 0.0)
        self.center_col = COLS / 2 + rng.uniform(-min(slack, 14.0), min(slack, 14.0))
        self.tilt = np.deg2rad(rng.uniform(-2.5, 2.5))
        self.pivot_y = 0.5 * self.height_px  # tilt about the hips

    def at(self, yx) -> np.ndarray:
        """(..., 2) reference (y, x) -> (..., 2) image (row, col)."""
        yx = np.asarray(yx, dtype=np.float64)
        dy = yx[..., 0] * self.height_px - self.pivot_y
        dx = yx[..., 1] * self.scale * self.width
        cos, sin = np.cos(self.tilt), np.sin(self.tilt)
        row = self.top + self.pivot_y + dy * cos - dx * sin
        col = self.center_col + dy * sin + dx * cos
        return np.stack([row, col], axis=-1)

    def r(self, radius):
        """A bone or organ radius in reference pixels -> image pixels."""
        return np.asarray(radius, dtype=np.float64) * self.scale * np.sqrt(self.width)


@dataclass
class _Site:
    """A thoracic bone part a lesion may sit on: centreline (K, 2) image (row, col), radius
    (image px), and its peak uptake per view (ANT, POST)."""

    kind: str
    points: np.ndarray
    radius: float
    uptake: tuple[float, float]


class _Phantom:
    """The uptake maps of one patient while they are built."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.body = _Body(rng)
        self.bone = np.zeros((2, ROWS, COLS))  # (view, H, W): lesions replace bone uptake here
        self.soft = np.zeros((2, ROWS, COLS))  # (view, H, W): soft tissue, organs, hot spots
        self.sites: list[_Site] = []
        self.hot_spots: list[HotSpot] = []
        self.bone_level = rng.uniform(0.8, 1.25)
        self.thorax_rows = [np.inf, -np.inf]  # clavicle tops .. lowest rib, image rows
        self.torso_cols = (0.0, float(COLS - 1))  # the torso across, set with the soft tissue
        self.joints: dict[str, np.ndarray] = {}  # where benign hot spots go, image (row, col)

    def _uptake(self, maps, uptake) -> tuple[float, float]:
        # Bone uptake scales with the patient's bone level; soft tissue has its own levels.
        return (uptake[0] * self.bone_level, uptake[1] * self.bone_level) if maps is self.bone else uptake

    # Drawing in reference coordinates. site: register the part as a lesion site;
    # extent: the part bounds the thorax (clavicles, ribs).
    def rod(self, maps, yx, radius, uptake, site: str | None = None, extent: bool = False):
        points = self.body.at(yx)
        radius = self.body.r(radius)
        uptake = self._uptake(maps, uptake)
        _rod(maps, points, radius, uptake)
        if site is not None:
            self.sites.append(_Site(site, points, float(np.mean(radius)), uptake))
        if extent:
            rmax = float(np.max(radius))
            self.thorax_rows[0] = min(self.thorax_rows[0], float(points[:, 0].min()) - rmax)
            self.thorax_rows[1] = max(self.thorax_rows[1], float(points[:, 0].max()) + rmax)
        return points

    def ellipsoid(self, maps, yx, radii, uptake, angle=0.0, shell=None, site: str | None = None):
        center = self.body.at(yx)
        radii = tuple(float(v) for v in self.body.r(radii))
        uptake = self._uptake(maps, uptake)
        _ellipsoid(maps, center, radii, uptake, angle + self.body.tilt, shell)
        if site is not None:
            self.sites.append(_Site(site, center[None], float(min(radii)), uptake))
        return center


def _skeleton(ph: _Phantom) -> None:
    rng, bone = ph.rng, ph.bone
    sym = (-1.0, 1.0)

    # Skull and face: a hollow calvarium (bright rim), mandible, maxilla (more anterior).
    ph.ellipsoid(bone, (0.068, 0.0), (50, 34), (0.55, 0.6), shell=0.3)
    ph.ellipsoid(bone, (0.095, 0.0), (10, 16), (0.3, 0.1))
    ph.rod(bone, [(0.104, -25), (0.128, -17), (0.137, 0), (0.128, 17), (0.104, 25)], 3.0, (0.5, 0.25))

    # Spine: vertebral bodies with disc gaps, brighter from behind. The thoracic ones are
    # lesion sites (vertebral bodies and pedicles).
    for y in np.linspace(0.118, 0.172, 7):  # cervical
        ph.ellipsoid(bone, (y, 0.0), (2.6, 5.5), (0.3, 0.6))
    thoracic_y = 0.182 + (np.arange(12) + 0.5) * (0.163 / 12)
    for k, y in enumerate(thoracic_y):
        rx = 6.5 + 0.25 * k
        ph.ellipsoid(bone, (y, 0.0), (5.0, rx), (0.42, 1.0), site="spine")
        for s in sym:  # pedicles / costovertebral joints
            ph.ellipsoid(bone, (y - 0.002, s * (rx - 0.5)), (2.2, 2.2), (0.12, 0.3))
    for y in 0.345 + (np.arange(5) + 0.5) * (0.108 / 5):  # lumbar
        ph.ellipsoid(bone, (y, 0.0), (7.8, 10.0), (0.45, 1.0))
        ph.joints.setdefault("lumbar", []).append(ph.body.at((y, 0.0)))

    # Sternum (anterior: bright in ANT, faint in POST) and clavicles.
    ph.ellipsoid(bone, (0.203, 0.0), (10, 9), (0.6, 0.15), site="sternum")
    ph.rod(bone, [(0.218, 0.0), (0.265, 0.0), (0.305, 0.0)], [5.0, 4.6, 3.5], (0.55, 0.15), site="sternum")
    for s in sym:
        pts = ph.rod(bone, [(0.186, s * 7), (0.178, s * 30), (0.181, s * 55), (0.172, s * 78)],
                     3.2, (0.55, 0.3), site="clavicle", extent=True)
        ph.joints[f"sc{int(s)}"] = pts[0]
        ph.joints[f"ac{int(s)}"] = pts[-1]

    # Scapulae (posterior): a faint blade with brighter borders and spine.
    for s in sym:
        sup, inf, glen = ph.body.at([(0.19, s * 45), (0.305, s * 52), (0.205, s * 76)])
        blade = draw.polygon2mask((ROWS, COLS), np.array([sup, inf, glen]))
        blade = ndimage.gaussian_filter(blade.astype(np.float64), 1.0)
        bone += np.array([0.1, 0.22])[:, None, None] * ph.bone_level * blade[None]
        ph.rod(bone, [(0.19, s * 45), (0.305, s * 52)], 2.3, (0.12, 0.33), site="scapula")
        ph.rod(bone, [(0.205, s * 76), (0.255, s * 68), (0.305, s * 52)], 2.8, (0.16, 0.38), site="scapula")
        ph.rod(bone, [(0.213, s * 46), (0.2, s * 66), (0.185, s * 80)], 2.5, (0.14, 0.4), site="scapula")

    # Ribs: from the costovertebral joint out, down and round to the front; the posterior
    # arc is nearer the back (brighter in POST), the anterior arc nearer the front. The
    # bony rib ends where the (MDP-silent) costal cartilage begins. Ribs 11-12 float.
    lateral = np.array([40, 53, 61, 66, 69, 71, 71, 70, 67, 62, 52, 42], dtype=np.float64)
    lateral *= rng.uniform(0.95, 1.05)
    for k in range(12):
        y0 = thoracic_y[k] - 0.002
        drop_post = (8.0 + 1.6 * k) / _REF_HEIGHT_PX
        drop_ant = (14.0 + 3.4 * k) / _REF_HEIGHT_PX if k < 10 else None
        w = lateral[k]
        for s in sym:
            p0, p1 = (y0, s * 9.0), (y0 + drop_post, s * w)
            ph.rod(bone, _bezier(p0, (y0 - 7.0 / _REF_HEIGHT_PX, s * 0.7 * w), p1), 2.1,
                   (0.13, 0.3), site="rib", extent=True)
            if drop_ant is not None:
                x_end = s * (12.0 + 1.6 * k if k else 12.0)
                p2 = (p1[0] + drop_ant, x_end)
                ph.rod(bone, _bezier(p1, (p1[0] + 0.9 * drop_ant, s * 0.97 * w), p2), 2.1,
                       (0.22, 0.09), site="rib", extent=True)

    # Arms: humeral head, humerus, elbow, forearm, hand; held a little away from the body.
    abduct = rng.uniform(0.0, 12.0)
    for s in sym:
        shoulder, elbow = (0.192, s * 84), (0.372, s * (92 + 0.6 * abduct))
        wrist = (0.51, s * (96 + abduct))
        ph.ellipsoid(bone, shoulder, (8, 8), (0.38, 0.42))
        ph.rod(bone, [shoulder, elbow], [4.8, 4.0], (0.26, 0.26))
        ph.ellipsoid(bone, elbow, (5, 7), (0.3, 0.3))
        for dx in (-3.0, 3.0):  # radius and ulna
            ph.rod(bone, [(elbow[0] + 0.006, elbow[1] + dx), (wrist[0], wrist[1] + dx)], 2.4, (0.18, 0.18))
        ph.ellipsoid(bone, (wrist[0] + 0.035, wrist[1]), (14, 7), (0.22, 0.22))
        ph.joints[f"shoulder{int(s)}"] = ph.body.at(shoulder)
        ph.joints[f"elbow{int(s)}"] = ph.body.at(elbow)
        ph.joints[f"hand{int(s)}"] = ph.body.at((wrist[0] + 0.03, wrist[1]))
        ph.joints[f"forearm{int(s)}"] = ph.body.at([(elbow[0] + 0.01, elbow[1]), wrist])

    # Pelvis: sacrum and sacro-iliac joints (posterior), iliac wings, pubis (anterior), hips.
    ph.ellipsoid(bone, (0.478, 0.0), (18, 16), (0.45, 0.8))
    for s in sym:
        ph.rod(bone, [(0.455, s * 14), (0.492, s * 19)], 3.5, (0.3, 0.7))
        ph.ellipsoid(bone, (0.452, s * 42), (26, 30), (0.18, 0.22))
        ph.rod(bone, [(0.47, s * 17), (0.43, s * 35), (0.425, s * 52), (0.45, s * 70)], 3.5, (0.3, 0.45))
        ph.ellipsoid(bone, (0.522, s * 19), (9, 12), (0.22, 0.18), shell=0.4)  # obturator ring
        ph.rod(bone, [(0.508, s * 40), (0.524, s * 3)], 3.0, (0.35, 0.2))  # superior pubic ramus
        ph.ellipsoid(bone, (0.508, s * 46), (8, 8), (0.5, 0.45))

    # Legs: femur (head, neck, trochanter, shaft), knee, patella (anterior), tibia, fibula, foot.
    for s in sym:
        ph.rod(bone, [(0.508, s * 46), (0.52, s * 60), (0.54, s * 58), (0.715, s * 31)],
               [5, 5.5, 5.5, 4.6], (0.3, 0.3))
        knee = (0.726, s * 30)
        ph.ellipsoid(bone, knee, (7, 10), (0.42, 0.42))
        ph.ellipsoid(bone, (0.717, s * 30), (5, 5), (0.25, 0.02))
        ph.rod(bone, [(0.737, s * 29), (0.94, s * 27)], [5, 3.6], (0.33, 0.3))
        ph.rod(bone, [(0.745, s * 37), (0.935, s * 34)], 2.0, (0.14, 0.18))
        ph.ellipsoid(bone, (0.955, s * 29), (9, 8), (0.4, 0.4))
        ph.rod(bone, [(0.96, s * 30), (0.99, s * 37)], 5.5, (0.28, 0.22))
        ph.joints[f"knee{int(s)}"] = ph.body.at(knee)


def _soft_tissue(ph: _Phantom) -> None:
    """Soft tissue (thick torso, thinner limbs), kidneys (posterior) and the bladder."""
    rng, soft = ph.rng, ph.soft
    level = rng.uniform(0.6, 1.5) * 0.07  # bone-to-soft-tissue ratio varies with renal function
    sym = (-1.0, 1.0)
    ph.ellipsoid(soft, (0.068, 0.0), (56, 40), (level, level))
    ph.rod(soft, [(0.11, 0.0), (0.18, 0.0)], 20, (level, level))
    torso = ph.rod(soft, [(0.19, 0.0), (0.3, 0.0), (0.4, 0.0), (0.5, 0.0)], [78, 80, 70, 80],
                   (1.5 * level, 1.5 * level))
    for s in sym:
        ph.rod(soft, [(0.19, s * 84), (0.372, s * 95), (0.51, s * 100)], [15, 12, 9], (0.6 * level,) * 2)
        ph.rod(soft, [(0.5, s * 38), (0.72, s * 30), (0.94, s * 28)], [32, 18, 11], (level, level))
    # Torso half-width at the thorax, in image columns (for the thorax box).
    half = float(ph.body.r(80))
    ph.torso_cols = (float(torso[:, 1].min()) - half, float(torso[:, 1].max()) + half)

    kidney = rng.uniform(0.4, 1.6)
    for s, y in ((-1.0, 0.367), (1.0, 0.355)):  # the patient's right kidney (image left) sits lower
        ph.ellipsoid(soft, (y, s * 30), (22, 10), (0.12 * kidney, 0.5 * kidney), angle=-s * 0.25)
    bladder = rng.uniform(0.8, 4.0)
    ph.ellipsoid(soft, (0.495, 0.0), (rng.uniform(9, 15), rng.uniform(14, 22)), (bladder, 0.7 * bladder))


def _benign_hot_spots(ph: _Phantom) -> None:
    """Hot spots that are not metastases, several of them inside the thorax."""
    rng, body = ph.rng, ph.body

    def spot(kind, center, radii, uptake, angle=0.0):
        _ellipsoid(ph.soft, center, tuple(float(v) for v in radii), uptake, angle)
        ph.hot_spots.append(HotSpot(kind, float(center[0]), float(center[1])))

    lvl = ph.bone_level
    sides = (-1, 1)
    # Degenerative knees (one or both), the medial compartment.
    if rng.random() < 0.6:
        for s in sides if rng.random() < 0.5 else (rng.choice(sides),):
            c = ph.joints[f"knee{s}"] + np.array([0.0, -s * body.r(4)])
            spot("degenerative_knee", c, body.r((4, 6)), (rng.uniform(0.5, 1.2) * lvl,) * 2)
    # Degenerative shoulders: acromioclavicular or glenohumeral joint.
    if rng.random() < 0.45:
        s = int(rng.choice(sides))
        c = ph.joints[f"ac{s}"] if rng.random() < 0.5 else ph.joints[f"shoulder{s}"]
        spot("degenerative_shoulder", c, body.r((3.5, 4.5)), tuple(rng.uniform(0.4, 1.0, 2) * lvl))
    # Sternoclavicular joint arthropathy (anterior).
    if rng.random() < 0.3:
        s = int(rng.choice(sides))
        spot("sternoclavicular", ph.joints[f"sc{s}"], body.r((3, 3)),
             (rng.uniform(0.6, 1.3) * lvl, 0.3 * lvl))
    # The injection site: a very hot dot at the elbow or the back of the hand, sometimes
    # with tracer trailing along the vein.
    if rng.random() < 0.85:
        s = int(rng.choice(sides))
        c = ph.joints[f"elbow{s}"] if rng.random() < 0.6 else ph.joints[f"hand{s}"]
        c = c + rng.normal(0.0, 1.5, 2)
        hot = rng.uniform(4.0, 25.0) * lvl
        spot("injection_site", c, rng.uniform(1.2, 2.5, 2), (hot, 0.6 * hot))
        if rng.random() < 0.3:
            forearm = ph.joints[f"forearm{s}"]
            vein = np.array([c, c + 0.3 * (forearm[1] - forearm[0])])
            _rod(ph.soft, vein, 1.2, (0.15 * hot, 0.1 * hot))
    # Healed rib fractures: small linear foci on 1-4 consecutive ribs, in a vertical line.
    if rng.random() < 0.3:
        s = int(rng.choice(sides))
        # Posterior arcs (brighter in POST) of one side, top to bottom.
        ribs = [site for site in ph.sites if site.kind == "rib" and site.uptake[1] > site.uptake[0]
                and np.sign(site.points[-1, 1] - site.points[0, 1]) == s]
        first = int(rng.integers(2, 8))
        count = int(rng.integers(1, 5))
        frac = rng.uniform(0.55, 0.9)  # how far out along the posterior arc
        for site in ribs[first:first + count]:
            i = int(round(frac * (len(site.points) - 1)))
            c = site.points[i]
            tangent = site.points[min(i + 1, len(site.points) - 1)] - site.points[max(i - 1, 0)]
            angle = np.arctan2(tangent[1], tangent[0])  # along the rib
            up = (rng.uniform(0.5, 1.2) * lvl, rng.uniform(0.8, 1.6) * lvl)
            spot("healed_rib_fracture", c, (2.6, 1.0), up, angle)
    # Degenerative spine: osteophytes at the margin of a lumbar (or low thoracic) vertebra.
    if rng.random() < 0.45:
        lumbar = ph.joints["lumbar"]
        c = lumbar[int(rng.integers(1, 5))].copy()
        if rng.random() < 0.25:  # T11-T12, inside the thorax
            spine = [site for site in ph.sites if site.kind == "spine"]
            c = spine[int(rng.integers(10, 12))].points[0].copy()
        c[1] += rng.choice(sides) * body.r(10)
        spot("degenerative_spine", c, body.r((3.5, 3)), (0.6 * lvl, rng.uniform(0.8, 1.6) * lvl))


def _lesion_shape(center: np.ndarray, radius: float, tangent_angle: float, elongation: float,
                  rng: np.random.Generator):
    """An irregular blob: a radius wobbling with angle (harmonics 2-4), stretched along the
    bone. Returns (region slices, (h, w) bool) of the pixels whose centres fall inside."""
    reach = radius * elongation * 1.5 + 2
    win = _window(center - reach, center + reach)
    region, rr, cc = win
    dr, dc = rr - center[0], cc - center[1]
    cos, sin = np.cos(tangent_angle), np.sin(tangent_angle)
    u, v = dr * cos + dc * sin, -dr * sin + dc * cos  # u along the bone
    theta = np.arctan2(v, u / elongation)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.25) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                       for k in (2, 3, 4))
    inside = np.hypot(u / elongation, v) < radius * wobble
    if not inside.any():  # a 2 mm lesion can fall between pixel centres: keep its nearest pixel
        inside[np.unravel_index(np.argmin(dr**2 + dc**2), inside.shape)] = True
    return region, inside


def _lesions(ph: _Phantom, thorax_box) -> tuple[list[Lesion], np.ndarray]:
    rng = ph.rng
    mask = np.zeros((ROWS, COLS), dtype=bool)
    lesions: list[Lesion] = []
    if rng.random() < P_NO_LESION:
        return lesions, mask
    wanted = min(int(rng.geometric(0.35)), MAX_LESIONS)
    kinds = list(LESION_SITE_WEIGHTS)
    weights = np.array([LESION_SITE_WEIGHTS[k] for k in kinds])
    row0, col0, rows, cols = thorax_box
    for _ in range(wanted * 20):
        if len(lesions) == wanted:
            break
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        site = rng.choice([s for s in ph.sites if s.kind == kind])
        pts = site.points
        if len(pts) == 1:  # a vertebra (or the manubrium): anywhere across it, pedicles included
            center = pts[0] + site.radius * np.array([rng.uniform(-0.4, 0.4), rng.uniform(-1.1, 1.1)])
            angle = np.pi / 2
        else:
            i = rng.uniform(0, len(pts) - 1)
            j = min(int(i), len(pts) - 2)
            center = pts[j] + (i - j) * (pts[j + 1] - pts[j])
            tangent = pts[j + 1] - pts[j]
            angle = float(np.arctan2(tangent[1], tangent[0]))
            center = center + rng.normal(0.0, 0.25 * site.radius, 2)
        # Mostly 5-15 mm, now and then the 2 mm or 20 mm ends.
        low, high = LESION_DIAMETER_MM
        diameter = low + (high - low) * rng.beta(1.6, 2.2)
        radius = diameter / 2 / PIXEL_SPACING_MM
        if not (row0 <= center[0] < row0 + rows and col0 <= center[1] < col0 + cols):
            continue
        # Keep lesions apart from each other and from benign hot spots, so each is one
        # outline and no benign spot is half a lesion.
        if any(np.hypot(center[0] - l.center_row, center[1] - l.center_col)
               < radius + l.diameter_mm / 2 / PIXEL_SPACING_MM + 3 for l in lesions):
            continue
        if any(np.hypot(center[0] - h.center_row, center[1] - h.center_col) < radius + 6
               for h in ph.hot_spots):
            continue
        # Metastases on thin long bones spread along them.
        elongation = rng.uniform(1.0, 1.6) if kind in ("rib", "clavicle") else rng.uniform(1.0, 1.25)
        region, inside = _lesion_shape(center, radius, angle, elongation, rng)
        contrast = rng.uniform(*LESION_CONTRAST)
        for view in (0, 1):
            # The lesion replaces the bone it sits on with `contrast` times its uptake.
            patch = ph.bone[view][region]
            patch[inside] = np.maximum(patch[inside], contrast * site.uptake[view])
        mask[region] |= inside
        lesions.append(Lesion(float(center[0]), float(center[1]), float(diameter), float(contrast), kind))
    return lesions, mask


def _camera(uptake: np.ndarray, fwhm_mm: float, counts: float, rng: np.random.Generator) -> np.ndarray:
    """Collimator blur, then Poisson counts scaled to ``counts`` in total. (H, W) -> uint16."""
    sigma_px = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / PIXEL_SPACING_MM
    blurred = np.clip(ndimage.gaussian_filter(uptake, sigma_px), 0.0, None)
    expected = blurred * (counts / blurred.sum())
    return np.minimum(rng.poisson(expected), np.iinfo(np.uint16).max).astype(np.uint16)


def _identity(seed: int, index: int) -> PatientIdentity:
    """Fake but realistic headers; UIDs derived from (seed, index), so reruns match."""
    rng = np.random.default_rng([seed, index, 1])
    birth = np.datetime64("1935-01-01") + int(rng.integers(0, 50 * 365))
    study = np.datetime64("2015-01-01") + int(rng.integers(0, 9 * 365))

    def uid(what: str) -> str:
        return generate_uid(entropy_srcs=["bonescan-synth", str(seed), str(index), what])

    return PatientIdentity(
        patient_id=f"SP-{int(rng.integers(10**7, 10**8))}",
        patient_name=f"SYNTH^PATIENT{index:04d}",
        birth_date=str(birth).replace("-", ""),
        study_date=str(study).replace("-", ""),
        study_uid=uid("study"),
        series_uid=uid("series"),
    )


def _scan_name(index: int) -> str:
    """The file stem of patient ``index``: carries no patient name, ID or UID."""
    return f"scan{index:04d}"


def synth_patient(seed: int, index: int) -> SyntheticPatient:
    """Patient ``index`` of the cohort ``seed``: the same pair always gives the same scan."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index, 0])
    ph = _Phantom(rng)
    _skeleton(ph)
    bone_mask = ph.bone.sum(axis=0) > BONE_MASK_LEVEL  # before lesions: they replace bone uptake
    _soft_tissue(ph)
    row0 = int(np.floor(ph.thorax_rows[0]))
    row1 = int(np.ceil(ph.thorax_rows[1]))
    col0 = max(int(np.floor(ph.torso_cols[0])), 0)
    col1 = min(int(np.ceil(ph.torso_cols[1])), COLS - 1)
    thorax_box = (row0, col0, row1 - row0 + 1, col1 - col0 + 1)
    _benign_hot_spots(ph)
    lesions, mask = _lesions(ph, thorax_box)

    uptake = ph.bone + ph.soft  # (2, H, W)
    # Scatter: a faint wide halo around everything, as Compton scatter gives a real camera.
    uptake += 0.04 * ndimage.gaussian_filter(uptake, (0, 8, 8))
    fwhm = rng.uniform(*FWHM_MM)
    counts_ant = rng.uniform(*COUNTS_PER_VIEW)
    counts_post = np.clip(counts_ant * rng.uniform(0.85, 1.15), *COUNTS_PER_VIEW)
    ant = _camera(uptake[0], fwhm, counts_ant, rng)
    # The camera behind the patient sees the posterior uptake left-right reversed.
    post = _camera(uptake[1][:, ::-1], fwhm, counts_post, rng)
    for a in (ant, post, mask, bone_mask):
        a.setflags(write=False)
    return SyntheticPatient(
        name=_scan_name(index), ant=ant, post=post, lesion_mask=mask, bone_mask=bone_mask,
        thorax_box=thorax_box, lesions=tuple(lesions), hot_spots=tuple(ph.hot_spots), fwhm_mm=float(fwhm),
        identity=_identity(seed, index),
    )


# ---------------------------------------------------------------- readers


@dataclass(frozen=True, eq=False)
class _ReaderLabels:
    """Three readers' polygons of one scan, in whole-body ANT (row, col) pixels.

    polygons: reader name -> list of closed (N, 2) polygons; deviating_reader: the reader who
    disagrees (DeltaA > threshold with both others) or None; deviation: what they did,
    "missed_lesion", "extra_lesion" or "larger_boundary", or None.
    """

    polygons: dict[str, list[np.ndarray]]
    deviating_reader: str | None
    deviation: str | None


def _raster(polygons: list[np.ndarray]) -> np.ndarray:
    return polygons_to_mask(polygons, (ROWS, COLS))


def _blob(center: np.ndarray, radius: float) -> np.ndarray:
    mask = np.zeros((ROWS, COLS), dtype=bool)
    rr, cc = draw.disk(tuple(center), radius, shape=(ROWS, COLS))
    mask[rr, cc] = True
    return mask


def _deviate(mode: str, patient: SyntheticPatient, polygons: list[np.ndarray],
             rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Candidate outlines of a reader who disagrees, mildest first."""
    if mode == "missed_lesion":
        # Drop one lesion (the largest last, which always disagrees).
        order = list(rng.permutation(len(polygons)))
        areas = [_raster([p]).sum() for p in polygons]
        order.append(int(np.argmax(areas)))
        return [[p for j, p in enumerate(polygons) if j != i] for i in order]
    if mode == "larger_boundary":
        i = int(rng.integers(len(polygons)))
        lesion = _raster([polygons[i]])
        return [polygons[:i] + mask_to_polygons(morphology.dilation(lesion, morphology.disk(k)))
                + polygons[i + 1:] for k in (2, 3, 4, 6)]
    # extra_lesion: the reader calls the hottest non-lesion spot of the thorax a lesion,
    # which is usually one of the benign hot spots.
    row0, col0, rows, cols = patient.thorax_box
    smooth = ndimage.gaussian_filter(patient.ant.astype(np.float64), 1.5)
    keep_out = morphology.dilation(patient.lesion_mask, morphology.disk(6))
    region = np.zeros_like(keep_out)
    region[row0 + 4:row0 + rows - 4, col0 + 4:col0 + cols - 4] = True
    smooth[~region | keep_out] = -np.inf
    center = np.array(np.unravel_index(np.argmax(smooth), smooth.shape), dtype=np.float64)
    return [polygons + mask_to_polygons(_blob(center, r)) for r in (2.5, 3.5, 5.0, 7.0)]


def _reader_labels(patient: SyntheticPatient, rng: np.random.Generator) -> _ReaderLabels:
    """Three readers outlining ``patient``'s lesions from the exact mask.

    Readers who agree click vertices a little apart (AGREEING_JITTER_PX), each outline
    kept within half the DeltaA threshold of the exact mask so that every pair agrees (DeltaA
    is a distance: it obeys the triangle inequality). With probability P_READER_DISAGREES
    one reader misses a lesion, adds one or draws one much larger, enough to exceed the
    threshold against both others.
    """
    exact = mask_to_polygons(np.asarray(patient.lesion_mask))
    truth = np.asarray(patient.lesion_mask)
    polygons: dict[str, list[np.ndarray]] = {}
    for reader in READERS:
        # A reader's hand: vertices a little off, less where that would move too many pixels.
        drawn = [p.copy() for p in exact]
        for jitter in AGREEING_JITTER_PX:
            candidate = []
            for p in exact:
                q = p + rng.normal(0.0, jitter, p.shape)
                q[-1] = q[0]
                candidate.append(q)
            if delta_a(_raster(candidate), truth) <= AGREEMENT_THRESHOLD / 2:
                drawn = candidate
                break
        polygons[reader] = drawn

    if rng.random() >= P_READER_DISAGREES:
        return _ReaderLabels(polygons, None, None)
    reader = READERS[int(rng.integers(len(READERS)))]
    others = [_raster(polygons[r]) for r in READERS if r != reader]
    modes = ["missed_lesion", "larger_boundary", "extra_lesion"] if exact else ["extra_lesion"]
    for mode in rng.permutation(modes):
        for candidate in _deviate(str(mode), patient, polygons[reader], rng):
            if all(delta_a(_raster(candidate), other) > AGREEMENT_THRESHOLD for other in others):
                polygons[reader] = candidate
                return _ReaderLabels(polygons, reader, str(mode))
    return _ReaderLabels(polygons, None, None)


# ---------------------------------------------------------------- cohort


def _dicom_options(index: int) -> dict:
    """Layout, view coding and compression of patient ``index``: cycled, so that any six
    consecutive patients hold every layout x coding pair; every fourth is JPEG 2000."""
    return {
        "layout": LAYOUTS[index % len(LAYOUTS)],
        "view_coding": VIEW_CODINGS[(index // len(LAYOUTS)) % len(VIEW_CODINGS)],
        "compressed": index % 4 == 3,
    }


def _to_crop(polygons: dict[str, list[np.ndarray]], box) -> dict[str, list[np.ndarray]] | None:
    """Polygons shifted into the crop ``box``, or None if any vertex leaves it."""
    row0, col0, rows, cols = box
    offset = np.array([row0, col0], dtype=np.float64)
    shifted = {r: [p - offset for p in ps] for r, ps in polygons.items()}
    for ps in shifted.values():
        for p in ps:
            if p.min() < -0.5 or p[:, 0].max() > rows - 0.5 or p[:, 1].max() > cols - 0.5:
                return None
    return shifted


def write_cohort(out_dir: str | os.PathLike, patients: int, seed: int = 0) -> CohortSummary:
    """Write ``patients`` synthetic scans the way a clinic has them, plus the exact truth.

    out_dir/dicom/: NM DICOM per scan (``scan0007.dcm``, or ``scan0007_ANT.dcm`` and
    ``scan0007_POST.dcm``), mixing layouts, view codings and JPEG 2000.
    out_dir/labels/readerK/: ``scan0007.json``, LabelMe, one per reader, drawn on the
    whole-body image or on the 256x256 thoracic crop (``thoracic_crop_box`` of the ANT image);
    imagePath (``scan0007_ANT.png`` / ``scan0007_ANT_thorax.png``) names the picture the
    reader saw; none is written.
    out_dir/truth/: ``scan0007.mask.png`` (uint8 0/255, 1024x256, the exact lesion mask in
    ANT coordinates) and ``scan0007.json`` (thorax box, lesions, hot spots, label frame and
    crop box, readers' agreement). No file name or truth file carries a patient name, ID,
    date or UID; only the DICOM headers do, as a clinic's would.
    """
    if patients < 0:
        raise ValueError(f"patients must be >= 0, got {patients}")
    out = Path(out_dir)
    dicom_dir, truth_dir = out / "dicom", out / "truth"
    for d in (dicom_dir, truth_dir, *(out / "labels" / r for r in READERS)):
        d.mkdir(parents=True, exist_ok=True)
    dicom_files = lesions = with_lesions = 0
    disagreeing: list[str] = []
    on_crop: list[str] = []
    for index in progress(range(patients), desc="synth", unit="patient"):
        patient = synth_patient(seed, index)
        options = _dicom_options(index)
        files = write_whole_body(dicom_dir, patient.name, patient.ant, patient.post,
                                 identity=patient.identity, pixel_spacing_mm=PIXEL_SPACING_MM,
                                 **options)
        rng = np.random.default_rng([seed, index, 2])
        labels = _reader_labels(patient, rng)

        frame, crop_box, polygons, shape = "whole_body", None, labels.polygons, (ROWS, COLS)
        image_path = f"{patient.name}_ANT.png"
        if rng.random() < P_LABELS_ON_CROP:
            box = thoracic_crop_box(patient.ant, size=CROP_SIZE)
            shifted = _to_crop(labels.polygons, box)
            if shifted is not None:  # a lesion outside the crop keeps the whole-body frame
                frame, crop_box, polygons = "thoracic_crop", box, shifted
                shape, image_path = (CROP_SIZE, CROP_SIZE), f"{patient.name}_ANT_thorax.png"
                on_crop.append(patient.name)
        for reader in READERS:
            write_labelme(out / "labels" / reader / f"{patient.name}.json", polygons[reader],
                          shape, image_path)

        skio.imsave(truth_dir / f"{patient.name}.mask.png",
                    patient.lesion_mask.astype(np.uint8) * 255, check_contrast=False)
        truth = {
            "scan": patient.name,
            "seed": seed,
            "index": index,
            "image_shape": [ROWS, COLS],
            "pixel_spacing_mm": PIXEL_SPACING_MM,
            "fwhm_mm": patient.fwhm_mm,
            "thorax_box": list(patient.thorax_box),
            "lesions": [asdict(lesion) for lesion in patient.lesions],
            "hot_spots": [asdict(spot) for spot in patient.hot_spots],
            "label_frame": frame,
            "label_crop_box": None if crop_box is None else [int(v) for v in crop_box],
            "readers_agree": labels.deviating_reader is None,
            "disagreeing_readers": [] if labels.deviating_reader is None else [labels.deviating_reader],
            "deviation": labels.deviation,
            "dicom": {**options, "files": [f.name for f in files]},
        }
        (truth_dir / f"{patient.name}.json").write_text(json.dumps(truth, indent=2) + "\n",
                                                        encoding="utf-8")

        dicom_files += len(files)
        lesions += len(patient.lesions)
        with_lesions += bool(patient.lesions)
        if labels.deviating_reader is not None:
            disagreeing.append(patient.name)
    return CohortSummary(out_dir=out, patients=patients, seed=seed, dicom_files=dicom_files,
                         lesions=lesions, patients_with_lesions=with_lesions,
                         disagreeing_scans=tuple(disagreeing), crop_labeled_scans=tuple(on_crop))
