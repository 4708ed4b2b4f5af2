"""What the nnU-Net Ray task runs (``nnunet``): nnU-Net v2's own planning, preprocessing,
trainer and predictor, through its Python API. Imported in that task only: nnunetv2 reads its
folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) from the environment at import, and
the task's runtime environment points them into the run's stage.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiments, preprocess
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


PLANS = "nnUNetPlans"
LOGGED = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "epoch_start_timestamps", "epoch_end_timestamps")


class BudgetTrainer(nnUNetTrainer):
    """nnU-Net's default trainer, for ``EPOCHS`` epochs of ``ITERATIONS`` iterations (its own
    default: 1,000 of 250, days on a CPU). A subclass rather than a ``--tr`` name: nnU-Net finds
    trainers by name inside its own package only, and the length is a parameter of the run."""

    EPOCHS, ITERATIONS = 1000, 250

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS
        self.num_val_iterations_per_epoch = max(1, self.ITERATIONS // 5)  # nnU-Net's 250 : 50


class SampledFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's dataset fingerprint with a foreground intensity sample of 1e5 voxels, not 1e8.

    The sample feeds nnU-Net's CT normalization only (clipping to its percentiles); channels
    not named CT are z-scored per image, and bonescan's are ANT and POST (the planned schemes
    are checked below), so the plans and the training are nnU-Net's own either way. Sampling
    and sorting 1e8 values per channel took ~18 s of a 40-s run on 2 CPUs whatever the cohort's size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = 1e5


def plan_train_predict(stage: Path, epochs: int, iterations: int, gpus: bool, *, dataset_id: int,
                       dataset_name: str, configuration: str) -> dict:
    """nnU-Net's whole pipeline on the exported dataset (``dataset_id``, named ``dataset_name``
    in its folders, trained in nnU-Net's ``configuration``); predictions of the test and validation
    scans under stage/predictions and stage/predictions_val. Returns nnU-Net's per-epoch log
    (LOGGED), its batch size and the network's parameter count."""
    # nnU-Net's process pools start by fork unless told otherwise; a Ray worker runs threads
    # (gRPC, its GC thread), and a forked child can hang on a lock one of them held (seen: a
    # pool joining a child that never ran). Spawned children start clean.
    multiprocessing.set_start_method("spawn", force=True)
    device = torch.device("cuda" if gpus else "cpu")
    extract_fingerprint_dataset(dataset_id, SampledFingerprintExtractor, num_processes=1, check_dataset_integrity=True,
                                show_progress_bar=False)
    plan_experiments([dataset_id])
    preprocessed = Path(nnUNet_preprocessed) / dataset_name
    schemes = load_json(preprocessed / f"{PLANS}.json")["configurations"][configuration]["normalization_schemes"]
    if "CTNormalization" in schemes:  # what the smaller intensity sample would change
        raise RuntimeError(f"nnU-Net planned CT normalization ({schemes}): its fingerprint needs the full intensity sample")
    preprocess([dataset_id], PLANS, configurations=(configuration,), num_processes=(1,), show_progress_bar=False)
    shutil.copy(stage / "splits_final.json", preprocessed / "splits_final.json")  # fold 0: bonescan's split

    # Data augmentation in the task's own process (nnU-Net's SingleThreadedAugmenter): Ray placed
    # the task on the CPUs it holds. Set only now: the planner sizes torch's threads by it.
    os.environ["nnUNet_n_proc_DA"] = "0"
    trainer_class = type("BudgetTrainer", (BudgetTrainer,), {"EPOCHS": epochs, "ITERATIONS": iterations})
    plans = {**load_json(preprocessed / f"{PLANS}.json"), "continue_training": False}  # as nnU-Net's own entry point sets it
    trainer = trainer_class(plans=plans, configuration=configuration, fold=0,
                            dataset_json=load_json(preprocessed / "dataset.json"), device=device)
    trainer.run_training()
    log = trainer.logger.local_logger.my_fantastic_logging  # every epoch's: loading the best checkpoint cuts it back
    log = {k: [float(v) for v in log[k]] for k in LOGGED}

    # The test scans, from the checkpoint nnU-Net kept as best on validation (its EMA pseudo Dice).
    best = Path(trainer.output_folder) / "checkpoint_best.pth"
    trainer.load_checkpoint(str(best if best.is_file() else Path(trainer.output_folder) / "checkpoint_final.pth"))
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=gpus, device=device, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json, "BudgetTrainer",
                                    trainer.inference_allowed_mirroring_axes)
    for images, out in (("imagesTs", "predictions"), ("imagesVal", "predictions_val")):
        (stage / out).mkdir(exist_ok=True)
        # Lists of each case's channel files, not a folder: for a folder nnU-Net lists them in a
        # process pool, which this predictor's "sequential" path otherwise avoids.
        files = sorted((stage / "nnUNet_raw" / dataset_name / images).glob("*.png"))
        cases = sorted({f.name.rsplit("_", 1)[0] for f in files})
        inputs = [[str(f) for f in files if f.name.rsplit("_", 1)[0] == case] for case in cases]
        predictor.predict_from_files_sequential(inputs, [str(stage / out / case) for case in cases],
                                                save_probabilities=False, overwrite=True)
    return {"log": log, "batch_size": int(trainer.batch_size),
            "parameters": sum(p.numel() for p in trainer.network.parameters())}
