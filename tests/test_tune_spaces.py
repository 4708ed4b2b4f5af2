"""tune_spaces/*.yaml: every shipped space loads and validates; a broken one fails naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bonescan_model.errors import InputError
from bonescan_platform.search_space import case_name, load_space

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))
BASE = {"model": {"width": 4, "recurrence": 1}, "epochs": 4}


def test_every_experiment_of_the_paper_has_its_space():
    assert {p.stem for p in SPACES} >= {"label_fraction", "recurrence", "loss_weights", "ablation", "datasets",
                                        "aggregation", "baselines"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_loads_and_gives_ray_a_search_space(path):
    from ray.tune.search.variant_generator import generate_variants

    space = load_space(path)
    variants = list(generate_variants(space.param_space()))
    grid = 1
    for p in space.parameters:
        grid *= len(p.values) if p.kind == "grid" else 1
    assert len(variants) == grid * space.num_samples
    for _resolved, config in variants:  # each trial Ray would run builds its training config
        space.trial_config(config, path)


def _values(name: str, parameter: str) -> list:
    (p,) = [p for p in load_space(REPO / "tune_spaces" / f"{name}.yaml").parameters if p.name == parameter]
    return list(p.values) if p.values else [p.low, p.high]


def test_spaces_hold_the_papers_settings():
    # Fig. 7: the paper's 9-37 % of all scans, as shares of our training scans (~59.5 % of all)
    assert [round(v * 0.595, 2) for v in _values("label_fraction", "label_fraction")] == [0.09, 0.18, 0.28, 0.37]
    # one curve per method, beside the same-label control (the unsupervised term off)
    space = load_space(REPO / "tune_spaces" / "label_fraction.yaml")
    methods = {case_name(c): space.trial_config({"method": c, "label_fraction": 0.15})
               for c in _values("label_fraction", "method")}
    assert {n: (c.semi, c.unsupervised_weight) for n, c in methods.items() if n != "supervised only"} == {
        "Chan–Vese l_U (paper)": ("chan_vese", 1.0), "mean teacher": ("mean_teacher", 1.0)}
    assert methods["supervised only"].unsupervised_weight == 0
    assert _values("recurrence", "model.recurrence") == [1, 2, 3, 4]  # Fig. 8, Table 4
    alpha, nu = _values("loss_weights", "alpha"), _values("loss_weights", "nu")
    assert alpha[0] < 0.4 < alpha[1] and nu[0] < 0.004 < nu[1]
    # Table 3: arms that differ in their data alone: one step budget, no on-the-fly augmentation
    space = load_space(REPO / "tune_spaces" / "datasets.yaml")
    assert _values("datasets", "dataset") == ["D1", "D2", "D3", "D4"]
    arms = [space.trial_config({"dataset": d}) for d in _values("datasets", "dataset")]
    assert {(c.max_steps, c.augment) for c in arms} == {(arms[0].max_steps, False)} and arms[0].max_steps
    # Fig. 9: the paper's D2 (views as samples) and D2_Agg (summed), our two-channel fusion, one step budget
    space = load_space(REPO / "tune_spaces" / "aggregation.yaml")
    arms = {case_name(c): space.trial_config({"arm": c}) for c in _values("aggregation", "arm")}
    assert {"views", "input", "none"} <= {c.model.aggregation for c in arms.values()}
    assert arms["D2: views as samples"].model.aggregation == "views"
    assert arms["D2_Agg: ANT + POST"].model.aggregation == "input"
    assert len({c.max_steps for c in arms.values()}) == 1 and arms["D2_Agg: ANT + POST"].max_steps
    cases = {case_name(c): c for c in _values("ablation", "case")}  # Table 5
    switches = {n: tuple(c[f"model.{k}"] for k in ("dilated", "inception", "residual")) for n, c in cases.items()}
    assert switches == {"1#": (False, False, False), "2#": (True, False, False), "3#": (True, True, False),
                        "4#": (True, True, True)}
    space = load_space(REPO / "tune_spaces" / "baselines.yaml")  # Table 6
    configs = {case_name(c): space.trial_config({"case": c}) for c in _values("baselines", "case")}
    assert (configs["U-Net"].model.arch, configs["U-Net"].label_fraction) == ("unet", 1.0)  # every training scan
    assert (configs["Proposed"].model.arch, configs["Proposed"].label_fraction) == ("recurrent", 0.62)
    assert (configs["nnU-Net"].trainer, configs["nnU-Net"].label_fraction) == ("nnunet", 1.0)  # every training scan
    assert {c.trainer for n, c in configs.items() if n != "nnU-Net"} == {"bonescan"}
    # nnU-Net's trial has a config of its own: its length and views, the split keys read as
    # training configs read them (the space's model and loss keys are the platform model's).
    nnunet = configs["nnU-Net"]
    assert (type(nnunet).__name__, nnunet.iterations, nnunet.views) == ("NnunetConfig", 50, "aggregated")
    assert (nnunet.epochs, nnunet.seed, nnunet.val_fraction) == (configs["U-Net"].epochs, 0, configs["U-Net"].val_fraction)
    control = configs["Proposed, supervised only"]
    assert control.unsupervised_weight == 0 and control.label_fraction == 0.62
    assert control.model == configs["Proposed"].model and control.supervised == configs["Proposed"].supervised
    for name in ("label_fraction", "baselines", "ablation", "aggregation", "datasets", "recurrence"):
        assert load_space(REPO / "tune_spaces" / f"{name}.yaml").num_samples >= 3  # training seeds


@pytest.mark.parametrize("change, key", [
    ({"parameters": {"model.recurence": {"grid": [1, 2]}}}, "parameters.model.recurence"),
    ({"parameters": {"epoch": {"grid": [1, 2]}}}, "parameters.epoch"),
    ({"parameters": {"alpha": {"uniform": [0.8, 0.2]}}}, "parameters.alpha.uniform"),
    ({"parameters": {"nu": {"loguniform": [0.0, 0.01]}}}, "parameters.nu.loguniform"),
    ({"parameters": {"alpha": {"uniform": [0.1]}}}, "parameters.alpha.uniform"),
    ({"parameters": {"alpha": {"range": [0.1, 0.2]}}}, "parameters.alpha"),
    ({"parameters": {"model.recurrence": {"grid": [1, 5]}}}, "model.recurrence=5"),
    ({"parameters": {"dataset": {"choice": ["D1", "D5"]}}}, "dataset=D5"),
    ({"parameters": {"lr": {"grid": []}}}, "parameters.lr.grid"),
    ({"parameters": {"case": {"grid": [{"name": "a", "model.dilatd": False}]}}}, "parameters.case.grid[0].model.dilatd"),
    ({"parameters": {"case": {"grid": [{"name": "a", "lr": 0.1}, 0.2]}}}, "parameters.case.grid"),
    ({"parameters": {"lr": {"grid": [{"alpha": 0.1}]}}}, "parameters.lr"),
    ({"schedular": {"type": "asha"}}, "schedular"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type"),
    ({"scheduler": {"grace_period": 9}}, "scheduler.grace_period"),
    ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor"),
    ({"scheduler": {"grace": 1}}, "scheduler.grace"),
    ({"scheduler": {"grace_period": 1.5}}, "scheduler.grace_period"),
    ({"scheduler": {"type": "asha"}, "fixed": {"max_steps": 100}}, "scheduler"),  # ASHA counts epochs
    ({"fixed": {"max_steps": 0}}, "max_steps"),
    ({"parameters": {"model.aggregation": {"grid": ["views", "both"]}}}, "model.aggregation=both"),
    ({"search": {"type": "optuna"}}, "search.type"),
    ({"search": {"seed": 1}}, "search.seed"),
    ({"resources": {"gpu": 1}}, "resources.gpu"),
    ({"resources": {"cpus_per_worker": 0}}, "resources.cpus_per_worker"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"fixed": {"epoch": 3}}, "fixed.epoch"),
    ({"fixed": {"model.width": 2}}, "fixed: model"),
    ({"metric": "dsc"}, "metric"),
    ({"mode": "maximum"}, "mode"),
    ({"num_samples": 2, "parameters": {"seed": {"grid": [0, 1]}}}, "num_samples"),
    ({"evaluate_runs": 0}, "evaluate_runs"),
    ({"report": {"x": "alpha"}}, "report.x"),
    ({"report": {"columns": ["dice"]}}, "report.columns.dice"),
    ({"report": {"paper": [{"lr": 0.1, "dice": 0.5}]}}, "report.paper[0].dice"),
    ({"report": {"paper": [{"lr": 0.1, "dsc": "high"}]}}, "report.paper[0].dsc"),
    ({"base": "missing.yaml"}, "base"),
    ({"compare": {"control": {"alpha": 0.4}}}, "compare.control.alpha"),  # not a swept parameter
    ({"compare": {"control": {"lr": 0.5}}}, "compare.control.lr"),  # not one of its grid values
    ({"compare": {"control": {"lr": 0.001}, "pair_by": "patient"}}, "compare.pair_by"),
    ({"compare": {"control": {}}}, "compare"),
    ({"compare": {"control": {"lr": 0.001}, "pairs": "seed"}}, "compare"),
    ({"fixed": {"nnunet_iterations": 5}}, "nnunet_iterations"),  # only a trainer: nnunet case trains nnU-Net
    ({"fixed": {"trainer": "nnunet", "nnunet_iterations": 0}}, "iterations"),
    ({"fixed": {"trainer": "monai"}}, "trainer"),
])
def test_broken_space_fails_on_load_naming_the_key(tmp_path, change, key):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    raw = {"base": "base.yaml", "parameters": {"lr": {"grid": [0.001, 0.01]}}, **change}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError) as err:
        load_space(path)
    assert str(err.value).startswith(f"{path}: ")
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_space_file_that_is_not_yaml_says_so(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("parameters: {lr: [grid: 1\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_space(path)
