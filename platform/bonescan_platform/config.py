"""Training configuration: YAML in configs/, validated once here into typed dataclasses.

Unknown keys and wrong types are errors naming the file and the key. Each run writes its
resolved config (``config.yaml``) beside its outputs, so a run can be repeated or resumed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bonescan_model.errors import InputError
from bonescan_model.network import ModelConfig


DATASETS = ("all", "D1", "D2", "D3", "D4")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow the paper's Table 2 where it has a value."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 400
    batch_size: int = 8
    lr: float = 0.0005
    beta1: float = 0.9  # Table 2's "learning momentum"
    beta2: float = 0.999
    weight_decay: float = 0.0001
    alpha: float = 0.4  # weight of l_S, Eq. 6
    unsupervised_weight: float = 1.0  # weight of l_U (the paper: 1); 0 trains on the labels alone
    nu: float = 0.004  # area weight of l_U, Eq. 7
    supervised: str = "active_contour"  # or "dice_ce"
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
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "weight_decay": self.weight_decay >= 0,
            "alpha": self.alpha >= 0,
            "unsupervised_weight": self.unsupervised_weight >= 0,
            "nu": self.nu >= 0,
            "supervised": self.supervised in ("active_contour", "dice_ce"),
            "length_weight": self.length_weight >= 0,
            "label_fraction": 0 <= self.label_fraction <= 1,
            "labeled_scans": self.labeled_scans is None or self.labeled_scans >= 0,
            "val_fraction": 0 < self.val_fraction < 1,
            "test_runs": self.test_runs >= 1,
            "dataset": self.dataset in DATASETS,
            "threshold": 0 < self.threshold < 1,
            "checkpoints_to_keep": self.checkpoints_to_keep >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key}: invalid value {getattr(self, key)!r}")
        if self.alpha == 0 and self.unsupervised_weight == 0:
            raise ValueError("alpha and unsupervised_weight: both 0, nothing would be learned")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str | os.PathLike = "<config>") -> TrainConfig:
        """Validate a mapping (YAML, a Tune trial's config) into a TrainConfig."""
        if not isinstance(data, dict):
            raise InputError(source, "a training config must be a mapping of keys to values")
        values = {}
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in hints:
                raise InputError(source, f"unknown key {key!r}; known keys: {', '.join(sorted(hints))}")
            if key == "model":
                values[key] = _model_config(value, source)
            else:
                values[key] = _typed(key, value, hints[key], source)
        try:
            return cls(**values)
        except ValueError as err:
            raise InputError(source, str(err)) from None


def _model_config(value, source) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    if not isinstance(value, dict):
        raise InputError(source, "model: must be a mapping")
    try:  # ModelConfig validates its own keys and values, naming them
        return ModelConfig.from_dict(value)
    except (TypeError, ValueError) as err:
        raise InputError(source, f"model: {err}") from None


def _typed(key: str, value, hint, source):
    """Check ``value`` against a scalar field's type; ints are accepted where floats are, and
    null where the field is optional (``int | None``)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    ok = {
        bool: isinstance(value, bool),
        int: _is_int(value),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise InputError(source, f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if hint is float else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_yaml(path: Path, kind: str):
    """A YAML file's content, or an InputError naming the file: missing, or not YAML.
    kind: what the file is, for the message ("config", "space", "GAN config")."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(path, f"no such {kind} file") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML ({err})") from None


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    path = Path(path)
    return TrainConfig.from_dict(read_yaml(path, "config") or {}, path)


def save_train_config(config: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))


def _plain(value):
    """Tuples -> lists, so the YAML stays readable by any YAML tool."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
