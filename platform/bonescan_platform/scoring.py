"""A model's scores on a split: DSC / CPA / Recall, the paper's runs, the lesion burden.

What the headline means is stated once, in ``bonescan_model.metrics`` (per-image means over
the lesion-bearing scans; lesion-free scans scored by their false positives). The headline is
run 0: the test images as they are, scored once.

The paper ran its trained model 10 times on the test subset and averaged (Section 3.3). A
trained network is deterministic, so here what varies between runs is the test images
themselves: run k >= 1 scores them after a seeded random label-preserving geometric transform
(flip, rotation, shift: the training augmentation, with seed k). That protocol's mean and spread
are their own fields (``runs_mean``, ``runs_std``): they say how stable the segmentation is
under positioning differences, not how much training varies -- that takes several training
seeds (`bonescan tune` with ``num_samples``).

Beside the masks, the lesion burden (``bonescan_model.burden``): per test image the predicted
and the true lesion count, lesion area (cm², the shards' pixel spacing) and share of the
skeleton involved, and how well they agree (Pearson and Spearman correlation, mean absolute
error) on run 0. The shards hold crops only, so the skeleton is segmented from the crop's ANT
channel as the model saw it (``preprocess.model_input``: normalized by its own percentile);
the method is scale-invariant, so this is the skeleton ``bonescan predict`` finds in the same
box of the raw scan (Dice 0.998 on synthetic scans). One skeleton per image serves both masks:
the numbers differ by the lesions alone.

Used by `bonescan evaluate`, by a run's end (``score_test``: the kept model, once), by the
sweep's table and the demo's baseline. Nothing here needs Ray: the split's scans are decoded
in this process.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from scipy import stats

from bonescan_model import engine, metrics
from bonescan_model.burden import burden, skeleton_mask
from bonescan_model.network import count_parameters
from bonescan_model.progress import progress
from bonescan_model.transforms import augmenting
from bonescan_platform import stream
from bonescan_platform.runs import Run

HEADLINE = ("dsc", "cpa", "recall", "pooled_dsc", "lesion_sensitivity", "fp_per_image", "lesion_free_fp_per_image")
BATCH = 8
PER_IMAGE = ("dsc", "cpa", "recall", "lesions")  # kept per test image in test.json (run 0)
PROTOCOL = ("headline: run 0, the test images as they are; runs_mean / runs_std: the paper's protocol, "
            "run k a seeded random flip/rotation/shift (seed k)")
# Burden quantities compared per image, predicted against true (Burden's field names).
BURDEN_FIELDS = ("lesions", "lesion_area_cm2", "skeleton_share")
BURDEN_SKELETON = "segmented from the normalized ANT channel of each crop (the crop is the region)"


def transformed(batches: Iterable[dict], run: int) -> Iterable[dict]:
    """Run ``run``'s view of the test batches: as they are (0), or the training augmentation
    seeded by ``run``."""
    return batches if run == 0 else augmenting(batches, np.random.default_rng(run))


def score_runs(model: torch.nn.Module, crops: dict[str, np.ndarray], runs: int, threshold: float = 0.5,
               label: str = "evaluate", split: str = "test") -> dict:
    """Score ``model`` on decoded crops (``stream.crops``) ``runs`` times -> the --json body.
    ``label`` names the progress bar (on a terminal only); ``split`` names the crops' split in
    the body's "burden" (``burden_agreement``, present when the crops carry their spacing)."""
    per_run, first = [], {}
    for run in progress(range(runs), desc=label, unit="run"):
        batches = transformed(stream.batches(crops, BATCH), run)
        per_image = engine.evaluate(model, batches, threshold=threshold)
        first = first or per_image
        per_run.append({"run": run, **metrics.summarize(per_image)})
    body = runs_body(per_run)
    if body["images"]:
        # Run 0's score of each test image, in the crops' (scan_key) order: what a paired
        # comparison's bootstrap resamples (bonescan_model.paired), image for image across runs.
        body["per_image"] = {"order": "scan_key", **{k: first[k].tolist() for k in PER_IMAGE}}
        if "pixel_spacing_mm" in crops:
            body["burden"] = burden_agreement(run0_masks(model, crops, threshold), crops, split)
    return body


@torch.no_grad()
def run0_masks(model: torch.nn.Module, crops: dict[str, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """The model's masks of the labeled crops as they are (run 0): (N, H, W) bool. A pass of its
    own: ``engine.evaluate`` keeps scores, not masks, and one more pass over the test split
    costs 1/runs of the scoring."""
    images = torch.from_numpy(crops["image"][crops["labeled"].astype(bool)])
    masks = [engine.predict_masks(model, images[i:i + BATCH], threshold).cpu().numpy()
             for i in range(0, len(images), BATCH)]
    return np.concatenate(masks) if masks else np.zeros((0, *images.shape[2:]), dtype=bool)


def burden_agreement(predicted: np.ndarray, crops: dict[str, np.ndarray], split: str = "test") -> dict:
    """Predicted against true burden on the labeled crops -> the body's "burden": per image
    (scan_key order) each of BURDEN_FIELDS predicted and true, and for each its Pearson r,
    Spearman rho and mean absolute error over the images (NaN where a correlation is undefined:
    fewer than 2 images, or one side constant, e.g. a model that finds nothing).

    predicted: (N, H, W) bool, run 0's masks of the labeled crops, in order (``run0_masks``)."""
    labeled = crops["labeled"].astype(bool)
    images, truths = crops["image"][labeled], crops["mask"][labeled, 0] > 0.5
    spacings = np.asarray(crops["pixel_spacing_mm"])[labeled]
    if len(predicted) != len(images):
        raise ValueError(f"{len(predicted)} predicted masks for {len(images)} labeled crops")
    pairs = []
    for pred, truth, image, spacing in zip(predicted, truths, images, spacings):
        skeleton = skeleton_mask(image[0])  # ANT; one skeleton for both masks
        pairs.append((burden(pred, image[0], float(spacing), skeleton=skeleton),
                      burden(truth, image[0], float(spacing), skeleton=skeleton)))
    body = {"split": split, "images": len(pairs), "order": "scan_key", "skeleton": BURDEN_SKELETON,
            "region": "the thoracic crop"}
    for name in BURDEN_FIELDS:
        ours = np.array([getattr(p, name) for p, _ in pairs], dtype=np.float64)
        true = np.array([getattr(t, name) for _, t in pairs], dtype=np.float64)
        body[name] = {"pearson": _correlation(stats.pearsonr, ours, true),
                      "spearman": _correlation(stats.spearmanr, ours, true),
                      "mean_abs_error": float(np.mean(np.abs(ours - true))) if len(pairs) else float("nan"),
                      "predicted": ours.tolist(), "true": true.tolist()}
    return body


def _correlation(test, a: np.ndarray, b: np.ndarray) -> float:
    """``test``'s statistic (scipy.stats.pearsonr / spearmanr), NaN where it is undefined."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant input: scipy warns, the value stands
        return float(test(a, b).statistic)


def runs_body(per_run: list[dict], protocol: str = PROTOCOL) -> dict:
    """The --json body of scored runs (``metrics.summarize`` of each, run 0 first): run 0 is
    the headline, runs_mean / runs_std over all of them."""
    first = per_run[0]
    if not first["images"]:
        return {"images": 0, "runs": per_run}
    return {
        **{k: first[k] for k in HEADLINE}, "images": first["images"], "lesion_images": first["lesion_images"],
        "runs_mean": {k: _finite_stat(np.mean, [r[k] for r in per_run]) for k in HEADLINE},
        "runs_std": {k: _finite_stat(np.std, [r[k] for r in per_run]) for k in HEADLINE},
        "runs": per_run, "protocol": protocol,
    }


def _finite_stat(stat, values: list[float]) -> float:
    """``stat`` of the finite values; NaN when there is none (a set without lesion-free scans
    has no lesion-free false-positive rate)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(stat(finite)) if finite else float("nan")


def test_seconds(model: torch.nn.Module, images: np.ndarray, threshold: float = 0.5) -> float:
    """Seconds to segment ``images`` (N, 2, H, W) in batches of 8 (Table 4's test time; a CPU
    runs each batch image by image, ``engine.predict_masks``), after a one-image warm-up that
    pays the allocations of the first call."""
    tensor = torch.from_numpy(images)
    if not len(tensor):
        return float("nan")
    engine.predict_masks(model, tensor[:1], threshold)
    start = time.perf_counter()
    for i in range(0, len(tensor), BATCH):
        engine.predict_masks(model, tensor[i:i + BATCH], threshold)
    return time.perf_counter() - start


def score_test(run: Run, crops: dict[str, np.ndarray] | None = None) -> dict:
    """The kept model of ``run`` scored once on the test split -> its test score (test.json).

    Called when a run (or a sweep's trial) has chosen its model on validation, never before.
    crops: the decoded test split, when the caller already holds it (a sweep scores many runs)."""
    trained = run.kept_model()
    crops = stream.crops(run.record.data, "test") if crops is None else crops
    body = score_runs(trained.model, crops, run.config.test_runs, trained.threshold)
    body = {"split": "test", **body, "epoch": trained.meta.get("epoch"), "threshold": trained.threshold,
            # whose weights the run kept: the student's, or its mean teacher's where validation chose it
            "kept_weights": trained.meta.get("kept_weights", "student"),
            "parameters": count_parameters(trained.model),
            "test_seconds": test_seconds(trained.model, crops["image"], trained.threshold)}
    run.write_test_score(body)
    return body


def print_summary(result: dict, label: str = "model") -> None:
    mean, std = result["runs_mean"], result["runs_std"]
    print(f"{label}: test split, {result['lesion_images']} lesion-bearing of {result['images']} labeled scans: "
          f"DSC {result['dsc']:.3f}, CPA {result['cpa']:.3f}, Recall {result['recall']:.3f} "
          f"(pooled DSC {result['pooled_dsc']:.3f}); lesion sensitivity {result['lesion_sensitivity']:.2f}, "
          f"{result['fp_per_image']:.2f} false positives per scan "
          f"({result['lesion_free_fp_per_image']:.2f} on lesion-free scans); "
          f"{len(result['runs'])}-run protocol: DSC {mean['dsc']:.3f} ± {std['dsc']:.3f}"
          + _burden_summary(result.get("burden")))


def _burden_summary(burden_body: dict | None) -> str:
    """The summary line's burden part: how predicted and true burden correlate."""
    if not burden_body:
        return ""
    area, share = burden_body["lesion_area_cm2"], burden_body["skeleton_share"]
    return (f"; burden ({burden_body['split']}): lesion area r {area['pearson']:.2f} "
            f"(Spearman {area['spearman']:.2f}, MAE {area['mean_abs_error']:.2f} cm²), skeleton share "
            f"r {share['pearson']:.2f} (Spearman {share['spearman']:.2f})")
