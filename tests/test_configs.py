"""One route from a mapping to a config (frozen.from_mapping): the training, model, GAN and sweep
configs refuse the same mistakes in the same words, naming the dotted key."""

from __future__ import annotations

import pytest

from bonescan_model.errors import InputError
from bonescan_model.frozen import from_mapping
from bonescan_model.gan_network import GanConfig
from bonescan_model.network import ModelConfig
from bonescan_model.train_config import TrainConfig
from bonescan_platform.search_space import Scheduler, Search


@pytest.mark.parametrize("cls, mapping, words", [
    (TrainConfig, {"epoch": 3}, "epoch: unknown key"),
    (TrainConfig, {"epochs": "3"}, "epochs: expected int, got str '3'"),
    (TrainConfig, {"epochs": True}, "epochs: expected int, got bool True"),
    (TrainConfig, {"lr": float("nan")}, "lr: must be a finite number"),
    (TrainConfig, {"labeled_scans": 2.5}, "labeled_scans: expected int, got float 2.5"),
    (TrainConfig, {"model": {"widht": 8}}, "model.widht: unknown key"),
    (TrainConfig, {"model": {"dilations": "1, 2"}}, "model.dilations: expected a list"),
    (TrainConfig, {"model": {"width": 2}}, "model: ModelConfig: width"),  # the model's own range check
    (TrainConfig, {"model": [1]}, "model: must be a mapping"),
    (ModelConfig, {"residual": "yes"}, "residual: expected bool, got str 'yes'"),
    (GanConfig, {"lr": "fast"}, "lr: expected float, got str 'fast'"),
    (Scheduler, {"grace_period": 1.5}, "grace_period: expected int, got float 1.5"),
    (Search, {"seed": 1}, "seed: unknown key"),
])
def test_every_config_refuses_a_bad_key_or_value_by_its_dotted_name(cls, mapping, words):
    with pytest.raises(ValueError) as err:
        from_mapping(cls, mapping)
    assert str(err.value).startswith(words), str(err.value)


def test_values_come_back_typed_and_the_file_is_named():
    cfg = TrainConfig.from_dict({"lr": 1, "labeled_scans": None, "model": {"dilations": [1, 2]}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.labeled_scans is None
    assert cfg.model.dilations == (1, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # a checkpoint's asdict round-trips
    with pytest.raises(InputError) as err:
        TrainConfig.from_dict({"batch_size": 10**20}, "configs/x.yaml")
    assert str(err.value) == f"configs/x.yaml: batch_size: {10**20} is out of range (at most {2**31 - 1})"
