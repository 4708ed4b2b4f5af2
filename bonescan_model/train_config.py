"""Training configuration: YAML in configs/, validated once here into typed dataclasses.

Unknown keys and wrong types are errors naming the file and the key. Each run keeps its
resolved config beside its outputs (the platform's ``runs.Run``), so a run can be repeated or
resumed. Framework-free, like the rest of bonescan_model: a laptop loop and the bench scripts
build their loss (``loss_for``) from the same config the platform trains.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch
import yaml

from bonescan_model.errors import InputError, quoted
from bonescan_model.frozen import from_mapping
from bonescan_model.loss import SEMI_KINDS, SUPERVISED_KINDS, SemiSupervisedLoss
from bonescan_model.network import ModelConfig, training_memory_bytes


DATASETS = ("all", "D1", "D2", "D3", "D4")
# Samples per step: beyond this no machine holds a step's activations (check_fits says so sooner).
MAX_BATCH = 1024
TRAINERS = ("bonescan", "nnunet")
NNUNET_VIEWS = ("both", "aggregated")


@dataclass(frozen=True)
class TrainConfig:
    """One training run of this platform's model, loss and loop. Defaults follow the paper's
    Table 2 where it has a value. (An nnU-Net baseline is an ``NnunetConfig``.)"""

    trainer: ClassVar[str] = "bonescan"
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 400
    # The training budget in optimizer steps, in place of epochs: the run trains the epochs
    # these steps take, the last one cut short at the budget (``schedule``), so that arms whose
    # data differ in size (D1 against D2, views as samples against aggregated pairs) train
    # the same number of steps. None: `epochs` epochs, however many steps they take.
    max_steps: int | None = None
    # Samples per optimizer step. A sample is a scan (its view pair), or one view under the
    # model's aggregation "views": a batch then reads batch_size / 2 scans (rounded up).
    # Mixed batches: labeled and unlabeled scans at the run's label share, so at 9 % labels a
    # batch of 4 carries no labeled scan about half the time. Validation batches use it too.
    batch_size: int = 8
    # Two-stream batches (the semi-supervised literature's, and the presets'): every step draws
    # labeled_batch_size samples from the labeled stream and unlabeled_batch_size from the
    # unlabeled one (samples as batch_size counts them: a scan, or one view under "views"), each shuffled and repeated on its own (seeded), so the supervised term sees
    # the same labeled scans per step at every label fraction. An epoch is then a number of
    # steps: the training scans over the scans a step draws (``schedule``). A supervised-only run
    # (unsupervised_weight 0) draws the labeled stream alone, at the same steps per epoch as
    # its semi-supervised arms. None (both): mixed batches of batch_size.
    labeled_batch_size: int | None = None
    unlabeled_batch_size: int | None = None
    lr: float = 0.0005
    beta1: float = 0.9  # Table 2's "learning momentum"
    beta2: float = 0.999
    weight_decay: float = 0.0001
    alpha: float = 0.4  # weight of l_S, Eq. 6
    unsupervised_weight: float = 1.0  # weight of l_U (the paper: 1); 0 trains on the labels alone
    nu: float = 0.004  # area weight of l_U, Eq. 7
    supervised: str = "active_contour"  # or "active_contour_normalized", "dice_ce" (loss.SUPERVISED_KINDS)
    # The unsupervised term, weighted by unsupervised_weight (0: supervised only):
    # "chan_vese" (Eq. 7, the paper), "chan_vese_local" (Eq. 7 on local contrast) or
    # "mean_teacher" (consistency with an EMA teacher: bonescan_model.consistency).
    semi: str = "chan_vese"
    # mean_teacher: the teacher's EMA decay, reached from the running mean (consistency.MeanTeacher)
    ema_decay: float = 0.99
    rampup_epochs: int = 4  # mean_teacher: epochs over which its weight ramps up to unsupervised_weight
    length_weight: float = 0.1
    # The label budget, counted on original training scans (never augmented or generated rows,
    # which cannot carry a label of their own): label_fraction is the share of them that keep
    # their masks, chosen per patient, seeded; labeled_scans, when set, is a count instead.
    # The paper's L_label is a share of *all* scans, train and test together (its 37 % is 53 %
    # of its training scans): tune_spaces/ converts, and every run records both (budget.json).
    label_fraction: float = 0.37
    labeled_scans: int | None = None
    # Validation patients: drawn from the training side of the shards (seeded by val_seed, not
    # by seed, so training seeds vary the training alone and share one validation set).
    # Validation chooses the kept checkpoint, early stopping and ASHA; the test split nothing.
    val_fraction: float = 0.15
    val_seed: int = 0
    augment: bool = True  # random label-preserving geometric augmentation per batch
    # Which rows of the shards train (Table 1): D1 originals, D2 + geometric copies
    # (`bonescan augment`), D3 + DCGAN samples, D4 all of them; "all": every row present.
    dataset: str = "all"
    seed: int = 0
    amp: bool = False  # mixed precision (float16 on GPUs, bfloat16 on CPUs)
    threshold: float = 0.5  # sigmoid threshold of a lesion pixel
    # The paper's test protocol (Section 3.3): the kept model scored on the test split this many
    # times (run 0 as is, run k a seeded flip/rotation/shift); test.json's headline is run 0.
    test_runs: int = 10
    checkpoints_to_keep: int = 2

    def __post_init__(self):
        if (self.labeled_batch_size is None) != (self.unlabeled_batch_size is None):
            raise ValueError("labeled_batch_size and unlabeled_batch_size: set both (two-stream batches) "
                             "or neither (mixed batches of batch_size)")
        checks = {
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "batch_size": 1 <= self.batch_size <= MAX_BATCH,
            "labeled_batch_size": self.labeled_batch_size is None or 1 <= self.labeled_batch_size <= MAX_BATCH,
            "unlabeled_batch_size": self.unlabeled_batch_size is None or 0 <= self.unlabeled_batch_size <= MAX_BATCH,
            "lr": self.lr > 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "weight_decay": self.weight_decay >= 0,
            "alpha": self.alpha >= 0,
            "unsupervised_weight": self.unsupervised_weight >= 0,
            "nu": self.nu >= 0,
            "supervised": self.supervised in SUPERVISED_KINDS,
            "semi": self.semi in SEMI_KINDS,
            "ema_decay": 0 <= self.ema_decay < 1,
            "rampup_epochs": self.rampup_epochs >= 0,
            "length_weight": self.length_weight >= 0,
            "label_fraction": 0 <= self.label_fraction <= 1,
            "labeled_scans": self.labeled_scans is None or self.labeled_scans >= 0,
            "val_fraction": 0 < self.val_fraction < 1,
            "test_runs": 1 <= self.test_runs <= 100,
            "dataset": self.dataset in DATASETS,
            "threshold": 0 < self.threshold < 1,
            "checkpoints_to_keep": 1 <= self.checkpoints_to_keep <= 100,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key}: invalid value {quoted(getattr(self, key))}")
        if self.alpha == 0 and self.unsupervised_weight == 0:
            raise ValueError("alpha and unsupervised_weight: both 0, nothing would be learned")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_plain(self) -> dict:
        """``to_dict`` with tuples as lists: as the YAML has it, and as JSON, MLflow and a
        checkpoint's metadata keep it."""
        return _plain(self.to_dict())

    @property
    def samples_per_scan(self) -> int:
        """Training samples one scan gives: its two views under aggregation "views", else 1."""
        return 2 if self.model.aggregation == "views" else 1

    @property
    def two_stream(self) -> bool:
        """Whether a step draws a labeled and an unlabeled batch (labeled_batch_size set)."""
        return self.labeled_batch_size is not None

    @property
    def labeled_scans_per_step(self) -> int:
        """Two-stream: the labeled scans a step draws (labeled_batch_size samples)."""
        return -(-self.labeled_batch_size // self.samples_per_scan)

    @property
    def unlabeled_scans_per_step(self) -> int:
        """Two-stream: the unlabeled scans a step draws (unlabeled_batch_size samples)."""
        return -(-self.unlabeled_batch_size // self.samples_per_scan)

    @property
    def scans_per_batch(self) -> int:
        """Scans a training step reads: both streams' (the same for a supervised-only control,
        so that its epochs are as many steps as its arms'), or a mixed batch's."""
        if self.two_stream:
            return self.labeled_scans_per_step + self.unlabeled_scans_per_step
        return -(-self.batch_size // self.samples_per_scan)

    def schedule(self, training_rows: int, workers: int = 1) -> dict[str, int]:
        """The run's epochs and optimizer steps for ``training_rows`` scans split over
        ``workers`` (Ray Train splits them equally, each worker a whole share, so a step is one
        batch on every worker). With max_steps the epochs are those the steps take; without,
        the steps are those the epochs take."""
        per_worker = max(1, training_rows // max(1, workers))
        steps_per_epoch = -(-per_worker // self.scans_per_batch)
        if self.max_steps is None:
            return {"epochs": self.epochs, "steps_per_epoch": steps_per_epoch,
                    "steps": self.epochs * steps_per_epoch}
        return {"epochs": -(-self.max_steps // steps_per_epoch), "steps_per_epoch": steps_per_epoch,
                "steps": self.max_steps}

    @classmethod
    def from_dict(cls, data: dict, source: str | os.PathLike = "<config>") -> TrainConfig:
        """Validate a mapping (YAML, a Tune trial's config) into a TrainConfig
        (``frozen.from_mapping``, the one route for every config); errors name the file and key."""
        try:
            return from_mapping(cls, data)
        except ValueError as err:
            raise InputError(source, str(err)) from None


@dataclass(frozen=True)
class NnunetConfig:
    """One nnU-Net v2 baseline run (`bonescan nnunet`, or a sweep's ``trainer: nnunet`` case).

    nnU-Net plans its own network, patch, batch and loss; bonescan sets its length, the views it
    is given, and the split and label budget, by the keys and with the meaning TrainConfig gives
    them, so it trains on the labels a bonescan arm of the same budget sees (supervised: it
    takes only the labeled scans)."""

    trainer: ClassVar[str] = "nnunet"
    max_steps: ClassVar[None] = None  # nnU-Net's length is epochs of iterations, never a step budget
    epochs: int = 50
    iterations: int = 250  # iterations per epoch (nnU-Net's own default: 1,000 epochs of 250)
    views: str = "both"  # "both": ANT and POST as two channels; "aggregated": Eq. 4's sum
    label_fraction: float = 1.0
    labeled_scans: int | None = None
    val_fraction: float = 0.15
    val_seed: int = 0
    seed: int = 0
    dataset: str = "all"

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "iterations": self.iterations >= 1, "views": self.views in NNUNET_VIEWS,
            "label_fraction": 0 <= self.label_fraction <= 1,
            "labeled_scans": self.labeled_scans is None or self.labeled_scans >= 0,
            "val_fraction": 0 < self.val_fraction < 1, "dataset": self.dataset in DATASETS,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key}: invalid value {quoted(getattr(self, key))}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_plain(self) -> dict:
        return self.to_dict()

    @classmethod
    def from_dict(cls, data: dict, source: str | os.PathLike = "<config>") -> NnunetConfig:
        try:
            return from_mapping(cls, data)
        except ValueError as err:
            raise InputError(source, str(err)) from None

    @classmethod
    def from_training_keys(cls, data: dict, source: str | os.PathLike = "<config>") -> NnunetConfig:
        """A sweep's case in a space of training configs (``trainer: nnunet``, with
        ``nnunet_iterations``): the keys nnU-Net takes, read with TrainConfig's meaning; the
        rest (the model, the loss, ...) is this platform's model's and does not apply."""
        model = data.get("model") or {}
        return cls.from_dict({
            "epochs": data.get("epochs", cls.epochs), "iterations": data.get("nnunet_iterations", cls.iterations),
            "views": "aggregated" if model.get("aggregation") == "input" else "both",
            **{k: data[k] for k in ("label_fraction", "labeled_scans", "val_fraction", "val_seed", "seed", "dataset")
               if k in data}}, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML's own rule
    keeps the last, so the first would be ignored without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping below says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


# No config, space or GAN config is near this large: a bigger file is a wrong file (or an attack
# on the parser), refused before it is read.
MAX_YAML_BYTES = 1 << 20
# YAML aliases share one object, so `a: &a [x, x]`, `b: &b [*a, *a]`, ... nine levels deep is
# a few lines that stand for a billion values; anything that walks it (a message, a dump)
# runs out of memory. A config's values, counted as if each alias were written out, stay far
# below this bound.
MAX_YAML_VALUES = 100_000


def read_yaml(path: Path, kind: str):
    """A YAML file's content, or an InputError naming the file: missing, a folder, not
    UTF-8 text, not YAML (a key given twice counts as not YAML), larger than MAX_YAML_BYTES,
    or aliases that stand for more than MAX_YAML_VALUES values.
    kind: what the file is, for the message ("config", "space", "GAN config")."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_YAML_BYTES:
            raise InputError(path, f"is {path.stat().st_size:,} bytes, larger than any {kind} file "
                                   f"(at most {MAX_YAML_BYTES:,})")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        if _expanded_size(data, {}) > MAX_YAML_VALUES:
            raise InputError(path, f"its aliases (*name) stand for more than {MAX_YAML_VALUES:,} values: "
                                   f"not a {kind} file")
        return data
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(path, f"no such {kind} file") from None
    except IsADirectoryError:
        raise InputError(path, f"is a folder, not a {kind} file") from None
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text (byte {err.start}); save the {kind} file as UTF-8") from None
    except OSError as err:
        raise InputError(path, f"cannot read the {kind} file ({err.strerror})") from None
    except RecursionError:
        raise InputError(path, "not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML ({' '.join(str(err).split())[:300]})") from None


def _expanded_size(value, sizes: dict[int, int]) -> int:
    """How many values ``value`` holds with every alias written out; each shared object is
    sized once (``sizes`` by id), so a billion-value document costs a few steps."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in sizes:
        sizes[id(value)] = 0  # a recursive alias refers back to itself: count it once
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = 1 + sum(min(_expanded_size(c, sizes), MAX_YAML_VALUES + 1) for c in children)
    return sizes[id(value)]


def load_train_config(path: str | os.PathLike, trainer: str = "bonescan") -> TrainConfig | NnunetConfig:
    """A training config file; an empty one is an error, not the paper's full 400-epoch run.
    trainer: "nnunet" reads an NnunetConfig (a run folder's own, as ``save_train_config`` wrote it)."""
    path = Path(path)
    data = read_yaml(path, "config")
    if data is None or data == {}:
        raise InputError(path, "the config is empty: set at least one key (configs/demo.yaml and "
                               "configs/paper.yaml are examples)")
    return (NnunetConfig if trainer == "nnunet" else TrainConfig).from_dict(data, path)


def check_fits(cfg: TrainConfig, source: str | os.PathLike, gpus: bool = False) -> None:
    """Refuse, before Ray starts or a run folder is written, a config whose training step would
    not fit in this machine's memory (or its GPU's, with ``gpus``): ``training_memory_bytes``
    counts weights, gradients, Adam's moments and a batch's activations. A cluster's workers
    may have more than the driver's machine; a model larger than the machine that submits it
    is still far more often a typo than a plan."""
    if not isinstance(cfg, TrainConfig):  # nnU-Net sizes its own network and batch
        return
    need = training_memory_bytes(cfg.model, cfg.batch_size)
    have, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if gpus and torch.cuda.is_available():
        have, what = torch.cuda.get_device_properties(0).total_memory, "the GPU's memory"
    if need > have:
        raise InputError(source, f"model.width {cfg.model.width} with batch_size {cfg.batch_size}: a training step "
                                 f"would hold about {need / 2**30:,.1f} GiB (weights, gradients, Adam state, "
                                 f"activations), more than {what} ({have / 2**30:,.1f} GiB); make the model "
                                 "or the batch smaller")


def save_train_config(config: TrainConfig | NnunetConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_plain(), sort_keys=False))


def _plain(value):
    """Tuples -> lists, so the YAML stays readable by any YAML tool."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def loss_for(cfg: TrainConfig) -> SemiSupervisedLoss:
    """The run's training loss (Eq. 6 with the configured terms and weights)."""
    return SemiSupervisedLoss(alpha=cfg.alpha, nu=cfg.nu, supervised=cfg.supervised, semi=cfg.semi,
                              length_weight=cfg.length_weight, unsupervised_weight=cfg.unsupervised_weight)
