"""Whole-body scan -> lesion mask, closed contours and a picture, for `bonescan predict`.

The network sees only the 256x256 thoracic crop (the paper's input, Section 2.1); its mask is
pasted back at the crop box so every output is in whole-body ANT coordinates (1024x256 for a
standard scan), the frame a physician reads and LabelMe labels are drawn in. Outside the crop
nothing was looked at, so nothing is reported there.

Per scan ``write_prediction`` writes the docs/design.md contract: ``<name>.mask.png`` (uint8 0/255),
``<name>.json`` (LabelMe, one closed polygon per lesion, and the scan's ``burden``) and
``<name>.overlay.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from skimage import io as skio
from skimage import measure
from torch import nn

from bonescan_model.burden import Burden, burden
from bonescan_model.cases import reference_view, scan_crop_box
from bonescan_model.contours import mask_to_polygons
from bonescan_model.engine import predict_masks
from bonescan_model.errors import InputError, describe, shown
from bonescan_model.io.dicom import WholeBodyScan, read_scan
from bonescan_model.io.labelme import write_labelme
from bonescan_model.preprocess import crop, model_input

# Overlay: drawn at twice the scan's pixel grid (512 x 2048 for a standard scan), so contours
# of 1-9 pixel lesions stay visible at a normal zoom. The window saturates at the 99th
# percentile of body counts, with a gamma below 1: at 99.5 % linear the bladder or an
# injection site left the ribs of the synthetic cohort and the GE scan a faint grey; at 98 %
# the spine already saturated.
OVERLAY_SCALE = 2
OVERLAY_DPI = 100
DISPLAY_PERCENTILE = 99.0
DISPLAY_GAMMA = 0.7


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Prediction:
    """The model's lesions on one whole-body scan.

    crop_box: (row0, col0, rows, cols) of the thoracic crop the network saw, in whole-body
    pixels (may reach outside the image, as ``preprocess.crop`` allows).
    mask: (H, W) bool in whole-body ANT coordinates (1024 x 256 for a standard scan); False
    outside the crop box. polygons: one closed (N, 2) float64 (row, col) curve per lesion
    (8-connected component), first point repeated last, in ``contours.mask_to_polygons``
    order. lesion_areas_mm2: each lesion's pixel count times pixel_spacing_mm ** 2, same order.
    burden: lesion count, lesion area and the share of the skeleton involved, inside the crop
    box (``bonescan_model.burden``: the skeleton is segmented from the ANT counts there).
    """

    name: str
    crop_box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)
    polygons: list[np.ndarray] = field(repr=False)
    lesion_areas_mm2: tuple[float, ...]
    pixel_spacing_mm: float
    burden: Burden

    @property
    def lesions(self) -> int:
        return len(self.polygons)


def read_and_crop(files: list[str], secret: bytes) -> tuple[WholeBodyScan, tuple[int, int, int, int]]:
    """One scan read and de-identified (``read_scan``) and its thoracic crop box, or InputError
    naming the file and the reason: a scan the crop finds no body in, and any failure of a
    reader on a bad file, included (one bad scan must not cost a batch, or a service's replica)."""
    try:
        scan = read_scan(files, secret)
        return scan, scan_crop_box(scan)
    except InputError:
        raise
    except ValueError as err:  # the crop found no body, e.g. an empty image
        raise InputError(files[0], " ".join(str(err).split())) from None
    except Exception as err:  # noqa: BLE001
        raise InputError(files[0], f"could not be read or cropped ({describe(err, redact=True)})") from None


def scan_input(scan: WholeBodyScan, box: tuple[int, int, int, int]) -> np.ndarray:
    """The network input of one scan: (2, 256, 256) float32, the shared ``model_input``."""
    ant = None if scan.ant is None else crop(scan.ant, box)
    post = None if scan.post is None else crop(scan.post, box)
    return model_input(ant, post)


def paste(crop_mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The inverse of ``preprocess.crop`` for a mask: (rows, cols) bool placed at ``box`` in an
    all-False (H, W) image; the part of the box outside the image (crop's zero padding) is
    dropped."""
    row0, col0, rows, cols = (int(v) for v in box)
    if crop_mask.shape != (rows, cols):
        raise ValueError(f"crop mask {crop_mask.shape} does not match box {box}")
    height, width = shape
    out = np.zeros((height, width), dtype=bool)
    r_lo, r_hi = max(row0, 0), min(row0 + rows, height)
    c_lo, c_hi = max(col0, 0), min(col0 + cols, width)
    if r_lo < r_hi and c_lo < c_hi:
        out[r_lo:r_hi, c_lo:c_hi] = crop_mask[r_lo - row0: r_hi - row0, c_lo - col0: c_hi - col0]
    return out


def make_prediction(scan: WholeBodyScan, box: tuple[int, int, int, int], crop_mask: np.ndarray) -> Prediction:
    """A Prediction from the network's (256, 256) bool mask of the crop at ``box``."""
    mask = paste(np.asarray(crop_mask, dtype=bool), box, reference_view(scan).shape)
    # Same labelling as mask_to_polygons (8-connectivity, label order), so areas line up.
    pixels = np.bincount(measure.label(mask, connectivity=2).ravel())[1:]
    return Prediction(
        name=scan.name,
        crop_box=tuple(int(v) for v in box),
        mask=mask,
        polygons=mask_to_polygons(mask),
        lesion_areas_mm2=tuple(float(n) * scan.pixel_spacing_mm**2 for n in pixels),
        pixel_spacing_mm=scan.pixel_spacing_mm,
        # The share is of the skeleton the network looked at: inside the crop box only.
        burden=burden(mask, reference_view(scan), scan.pixel_spacing_mm, region=box),
    )


@torch.no_grad()
def predict_scans(
    model: nn.Module,
    scans: Sequence[WholeBodyScan],
    *,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
    boxes: Sequence[tuple[int, int, int, int]] | None = None,
) -> list[Prediction]:
    """The thoracic crops of all ``scans`` through the model (``engine.predict_masks``: one
    pass on a GPU, crop by crop on a CPU); one Prediction per scan, in order. The model is moved to ``device`` and put in eval mode. A pixel is a lesion where
    sigmoid(logit) > threshold. boxes: each scan's ``scan_crop_box``, when the caller already
    found them (to turn away a scan without a body before the batch); found here otherwise,
    raising ValueError for a scan whose body cannot be found."""
    if not scans:
        return []
    if boxes is None:
        boxes = [scan_crop_box(scan) for scan in scans]
    if len(boxes) != len(scans):
        raise ValueError(f"got {len(boxes)} boxes for {len(scans)} scans")
    views = np.stack([scan_input(scan, box) for scan, box in zip(scans, boxes)])  # (B, 2, 256, 256)
    model.to(device)
    masks = predict_masks(model, torch.from_numpy(views).to(device), threshold)  # (B, 256, 256)
    masks = masks.cpu().numpy()
    return [make_prediction(scan, box, m) for scan, box, m in zip(scans, boxes, masks)]


def predict_scan(
    model: nn.Module, scan: WholeBodyScan, *, threshold: float = 0.5, device: str | torch.device = "cpu"
) -> Prediction:
    """``predict_scans`` for one scan."""
    return predict_scans(model, [scan], threshold=threshold, device=device)[0]


# ---------------------------------------------------------------------------------- outputs


def output_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """The three files of one scan: keys "mask", "labelme", "overlay"."""
    out = Path(out_dir)
    return {"mask": out / f"{name}.mask.png", "labelme": out / f"{name}.json",
            "overlay": out / f"{name}.overlay.png"}


def write_prediction(out_dir: str | os.PathLike, prediction: Prediction, ant_whole_body: np.ndarray) -> list[Path]:
    """Write the mask PNG, the LabelMe JSON and the overlay PNG of one scan; returns their paths.

    ant_whole_body: (H, W) counts the prediction is drawn over (``reference_view(scan)``).
    The LabelMe imagePath names the mask PNG beside it: the one written picture on exactly
    the polygons' pixel grid, so LabelMe opens it with every vertex in place. The burden is
    the file's extra top-level key "burden" (``Burden.to_json``), which LabelMe keeps.
    """
    paths = output_paths(out_dir, prediction.name)
    paths["mask"].parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(paths["mask"], prediction.mask.astype(np.uint8) * 255, check_contrast=False)
    write_labelme(paths["labelme"], prediction.polygons, prediction.mask.shape, paths["mask"].name,
                  extra={"burden": prediction.burden.to_json()})
    render_overlay(paths["overlay"], prediction, ant_whole_body)
    return list(paths.values())


def display_norm(counts: np.ndarray) -> PowerNorm:
    """How to show a bone scan: 0 to a high percentile of the body's counts, gamma < 1."""
    body = counts[counts > 0]
    vmax = float(np.percentile(body, DISPLAY_PERCENTILE)) if body.size else 1.0
    return PowerNorm(DISPLAY_GAMMA, vmin=0.0, vmax=max(vmax, 1.0), clip=True)


def render_overlay(path: str | os.PathLike, prediction: Prediction, counts: np.ndarray) -> Path:
    """The whole-body image with the lesions outlined in red and the crop box dashed, as a PNG
    of OVERLAY_SCALE times the scan's pixel grid.

    Shown inverted (hot = dark), as bone scans are read in the clinic. The figure is built
    without pyplot so that concurrent callers (Ray actors, threads) share no global state.
    """
    height, width = counts.shape
    fig = Figure(figsize=(OVERLAY_SCALE * width / OVERLAY_DPI, OVERLAY_SCALE * height / OVERLAY_DPI),
                 dpi=OVERLAY_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(counts, cmap="gray_r", norm=display_norm(counts), interpolation="nearest")
    row0, col0, rows, cols = prediction.crop_box
    # Pixel (r, c) covers [c - 0.5, c + 0.5]: the box's outline runs along its pixels' edges.
    ax.add_patch(Rectangle((col0 - 0.5, row0 - 0.5), cols, rows, fill=False, edgecolor="tab:blue",
                           linestyle="--", linewidth=1.0))
    ax.text(max(col0, 0) + 2, max(row0, 0) + 2, "region analysed", color="tab:blue", fontsize=6,
            va="top", ha="left")
    # A white rim under the red line keeps it visible on saturated (black) bone as on background.
    rim = [patheffects.withStroke(linewidth=2.6, foreground="white")]
    for polygon in prediction.polygons:
        ax.plot(polygon[:, 1], polygon[:, 0], color="red", linewidth=1.2, path_effects=rim)
    area = sum(prediction.lesion_areas_mm2)
    # shown: a file name that is not UTF-8 (lone surrogates) cannot be drawn as text
    label = f"{shown(prediction.name)}\n{prediction.lesions} lesion{'s' if prediction.lesions != 1 else ''}"
    if prediction.lesions:
        # The share, on a line of its own: of the skeleton inside the dashed box, not the body's.
        share = 100 * prediction.burden.skeleton_share
        label += f", {area / 100:.1f} cm²\n{share:.2f} % of the skeleton in the box"
    ax.text(3, 3, label, color="black", fontsize=8, va="top", ha="left",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 2})
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    fig.savefig(path, dpi=OVERLAY_DPI)
    return Path(path)
