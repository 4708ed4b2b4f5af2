"""Sweeps as data: the YAML format of ``tune_spaces/*.yaml``, validated on load.

A space file (every key but ``base`` and ``parameters`` is optional)::

    base: ../configs/demo.yaml        # the training config every trial starts from (relative to this file)
    fixed: {dataset: D2}              # overrides of the base for every trial
    parameters:                       # what varies; names are dotted paths into TrainConfig
      label_fraction: {grid: [0.0, 0.09, 0.18]}   # every value
      model.recurrence: {choice: [1, 2, 3]}       # one value drawn per trial
      alpha: {uniform: [0.2, 0.8]}                # drawn per trial
      nu: {loguniform: [0.001, 0.016]}
      case:                           # a case parameter: its values are mappings of dotted paths,
        grid:                         # with an optional display `name`
          - {name: "1#", model.dilated: false, model.inception: false}
          - {name: "2#", model.dilated: true, model.inception: false}
    num_samples: 1          # trials per configuration, each with its own seed: base seed + 0, 1, ...
    metric: val_dsc         # what ASHA and "best" look at: a metric each epoch reports
    mode: max
    scheduler: {type: asha, grace_period: 4, reduction_factor: 2}  # max_t: the trials' epochs
    search: {type: random, random_state: 0}   # Ray's variant generator: grid expanded, the rest drawn
    resources: {workers: 1, cpus_per_worker: auto, gpus: auto}     # per trial
    max_concurrent_trials: auto
    evaluate_runs: 10       # the paper's test protocol on each trial's kept model: sets every trial's
                            # test_runs (default: the base config's test_runs)
    compare:                # the control arm: every other value of its parameters is an arm, paired
      control: {method: "supervised only"}   # with it by seed (and the other parameters' values);
      pair_by: seed         # EXP/comparisons.csv: intervals and verdicts (comparisons.py)
    report:                 # how `bonescan report` lays the experiment out
      title: "Fig. 7: labeled fraction"
      x: label_fraction     # the figures' x axis (default: the first parameter)
      columns: [labeled_scans, dsc, cpa, recall]   # the paper-layout table, after the parameters
      headers: {label_fraction: "L_label"}         # optional: a column's header in the table
      paper:                # the published numbers: keys are parameters (to match), columns or the
                            # paper's setting (PAPER_SETTING: its data, labels and training, which
                            # the report compares with each arm's); values in the units the table
                            # shows (parameters in millions)
        - {label_fraction: 0.37, dsc: 0.683, cpa: 0.715, recall: 0.601}
      paper_source: "Lin et al. 2022, Section 3.4.1"

Dotted paths (``fixed`` keys, parameter names, the keys of case mappings) name a TrainConfig
field or a ``model.`` field of ModelConfig. Every grid and choice value, and both ends of every
range, is built into a TrainConfig from base + fixed + overrides while loading, so a bad key or
value fails here, naming it, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from bonescan_model.errors import InputError, quoted
from bonescan_model.frozen import from_mapping
from bonescan_model.network import ModelConfig
from bonescan_model.train_config import TRAINERS, NnunetConfig, TrainConfig, load_train_config, read_yaml

KINDS = ("grid", "choice", "uniform", "loguniform")
TOP_KEYS = ("base", "fixed", "parameters", "num_samples", "metric", "mode", "scheduler", "search",
            "resources", "max_concurrent_trials", "evaluate_runs", "report", "compare")
RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus")
REPORT_KEYS = ("title", "x", "columns", "headers", "paper", "paper_source")
AUTO = "auto"
# A sweep of more trials than this is a typo'd grid, not an experiment to run.
MAX_TRIALS = 1000
# Combinations of candidate values checked together while loading (~1 ms each).
MAX_CHECKED = 2048

# The results table's per-trial columns a report can show (besides parameters and config paths),
# with the header the report gives them.
RESULT_COLUMNS = {
    "labeled_scans": "L_label (scans)",
    "labeled_patients": "labeled patients",
    # The paper's L_label: labeled scans over all scans, train and test together.
    "labeled_share_of_all": "L_label (share of all scans)",
    "labeled_share_of_train": "labeled share of training scans",
    "train_scans": "training scans",
    "val_scans": "validation scans",
    "training_rows": "training scans with their copies",
    # Samples: a scan, or each of its views under aggregation "views" (TrainConfig.samples_per_scan).
    "training_samples": "training samples",
    "labeled_samples": "labeled samples",
    "steps": "optimizer steps",
    "samples_seen": "samples seen in training",
    "dsc": "test DSC",
    "cpa": "test CPA",
    "recall": "test Recall",
    "pooled_dsc": "test pooled DSC",
    "lesion_sensitivity": "test lesion sensitivity",
    "fp_per_image": "test FP / scan",
    "lesion_free_fp_per_image": "test FP / lesion-free scan",
    "protocol_dsc": "test DSC, paper's runs",
    "protocol_cpa": "test CPA, paper's runs",
    "protocol_recall": "test Recall, paper's runs",
    "parameters": "parameters (M)",
    "test_seconds": "test time (s)",
    "test_images": "test images",
    "epochs": "epochs",
    "best_epoch": "best epoch",
    "best_val_dsc": "best val DSC",
    "final_val_dsc": "final val DSC",
    "train_seconds": "training time (s)",
    "trial_seconds": "trial time (s)",
}


# What a paper row may state of the paper's own arm besides its scores, shown or not: the report
# marks where the measured arm differs from it (report.differences).
PAPER_SETTING = ("all_scans", "training_samples", "labeled_samples", "labeled_scans", "labeled_share_of_all",
                 "epochs", "steps")


@dataclass(frozen=True)
class Parameter:
    """One swept parameter. values: grid/choice values; low, high: the range of a distribution."""

    name: str
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def is_case(self) -> bool:
        return bool(self.values) and isinstance(self.values[0], dict)

    def candidates(self) -> tuple:
        """The values a trial can get, as far as validation needs them: all of a grid or
        choice, both ends of a range."""
        return self.values if self.kind in ("grid", "choice") else (self.low, self.high)

    def domain(self):
        from ray import tune

        return {"grid": lambda: tune.grid_search(list(self.values)),
                "choice": lambda: tune.choice(list(self.values)),
                "uniform": lambda: tune.uniform(self.low, self.high),
                "loguniform": lambda: tune.loguniform(self.low, self.high)}[self.kind]()


@dataclass(frozen=True)
class Scheduler:
    """`scheduler`: Ray Tune's ASHA, its time in epochs (max_t: the trials' epochs)."""

    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self):
        if self.type != "asha":
            raise ValueError(f"scheduler.type: only 'asha' is supported, got {quoted(self.type)}")
        if self.grace_period < 1:
            raise ValueError(f"scheduler.grace_period: must be >= 1 epoch, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ValueError(f"scheduler.reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class Search:
    """`search`: Ray's own variant generator (grids expanded, the rest drawn). The others
    (Optuna, HyperOpt, ...) are extra installs and cannot expand the grids the paper's
    experiments are."""

    type: str = "random"
    random_state: int | None = None

    def __post_init__(self):
        if self.type != "random":
            raise ValueError(f"search.type: only 'random' (Ray's grid + random variant generator) is "
                             f"supported, got {quoted(self.type)}")


@dataclass(frozen=True)
class SearchSpace:
    source: str
    base: dict  # the resolved base TrainConfig, as TrainConfig.to_dict() gives it
    parameters: tuple[Parameter, ...]
    fixed: dict = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "val_dsc"
    mode: str = "max"
    scheduler: Scheduler | None = None
    search: Search = field(default_factory=lambda: Search())
    resources: dict = field(default_factory=lambda: {"workers": 1, "cpus_per_worker": AUTO, "gpus": AUTO})
    max_concurrent_trials: int | str = AUTO
    evaluate_runs: int | None = None
    report: dict = field(default_factory=dict)
    # {"control": {parameter: the control's value, as results show it}, "pair_by": "seed"}, or
    # None: the arms a sweep compares with their control (comparisons.py, bonescan_model.paired)
    compare: dict | None = None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    def seeds(self) -> list[int]:
        return [self.base["seed"] + i for i in range(self.num_samples)]

    def param_space(self) -> dict:
        """Ray Tune's param_space: one domain per parameter, and the seeds as a grid."""
        from ray import tune

        space = {p.name: p.domain() for p in self.parameters}
        if self.num_samples > 1:
            space["seed"] = tune.grid_search(self.seeds())
        return space

    def trial_config(self, params: dict, source: str = "<trial>") -> TrainConfig | NnunetConfig:
        """base + fixed + a trial's parameter values -> its TrainConfig (an NnunetConfig for a
        ``trainer: nnunet`` case)."""
        runs = {} if self.evaluate_runs is None else {"test_runs": self.evaluate_runs}
        return _build(self.base, {**runs, **self.fixed, **overrides(params)}, source)

    def uses_trainer(self, trainer: str) -> bool:
        """Whether a trial of this space can be trained by ``trainer`` (TrainConfig.trainer)."""
        return any(self.trial_config(params).trainer == trainer for params in _first_combos(self.parameters))

    def max_epochs(self) -> int:
        """The most epochs any trial trains: ASHA's max_t."""
        values = [self.trial_config({}).epochs]
        for p in self.parameters:
            values += [self.trial_config({p.name: v}).epochs for v in p.candidates()]
        return max(values)


def overrides(params: dict) -> dict:
    """A trial's parameter values -> {dotted path: value}: case mappings are spread out."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            out.update({k: v for k, v in value.items() if k != "name"})
        else:
            out[name] = value
    return out


def case_name(value) -> str:
    """How a parameter value is shown: a case's `name`, else its overrides, else the value."""
    if isinstance(value, dict):
        return str(value.get("name") or ", ".join(f"{k}={v}" for k, v in value.items()))
    return str(value)


def load_space(path: str | os.PathLike) -> SearchSpace:
    path = Path(path)
    raw = read_yaml(path, "space")
    if not isinstance(raw, dict):
        raise InputError(path, "a space file must be a mapping (see tune_spaces/README in search_space.py)")
    if "base" not in raw:
        raise InputError(path, "base: required (the training config every trial starts from)")
    if not isinstance(raw["base"], str):
        raise InputError(path, "base: must be a path to a training config YAML")
    base_path = (path.parent / raw["base"]).resolve()
    if not base_path.is_file():
        raise InputError(path, f"base: no such config file {base_path}")
    return parse_space(raw, path, load_train_config(base_path))


def parse_space(raw: dict, source: str | os.PathLike, base: TrainConfig) -> SearchSpace:
    """Validate a space mapping against a base config (``base:`` already resolved)."""
    def fail(key: str, reason: str):
        raise InputError(source, f"{key}: {reason}")

    for key in raw:
        if key not in TOP_KEYS:
            fail(key, f"unknown key; known keys: {', '.join(TOP_KEYS)}")
    base_dict = base.to_dict()

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "must be a mapping of dotted config paths to values")
    for key in fixed:
        _check_path(key, f"fixed.{key}", fail)
    _build(base_dict, fixed, source, "fixed")

    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        fail("parameters", "required: a mapping of parameter names to {grid|choice|uniform|loguniform: ...}")
    parameters = tuple(_parameter(name, spec, fail) for name, spec in params_raw.items())

    num_samples = raw.get("num_samples", 1)
    if not _is_int(num_samples) or num_samples < 1:
        fail("num_samples", f"must be an int >= 1, got {quoted(num_samples)}")
    if num_samples > 1 and any(_touches(p, "seed") for p in parameters):
        fail("num_samples", "seeds come from num_samples; do not also sweep `seed`")

    metric = raw.get("metric", "val_dsc")
    if not isinstance(metric, str) or not metric.startswith(("val_", "train_")):
        fail("metric", f"must be a metric every epoch reports (val_dsc, val_cpa, train_loss, ...), got {quoted(metric)}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        fail("mode", f"must be max or min, got {quoted(mode)}")

    space = SearchSpace(
        source=str(source), base=base_dict, parameters=parameters, fixed=dict(fixed),
        num_samples=num_samples, metric=metric, mode=mode,
        scheduler=_scheduler(raw.get("scheduler"), fail), search=_search(raw.get("search"), fail),
        resources=_resources(raw.get("resources"), fail),
        max_concurrent_trials=_auto_int(raw.get("max_concurrent_trials", AUTO), "max_concurrent_trials", fail),
        evaluate_runs=raw.get("evaluate_runs"), report={})
    if space.evaluate_runs is not None and (not _is_int(space.evaluate_runs) or space.evaluate_runs < 1):
        fail("evaluate_runs", f"must be an int >= 1, got {quoted(space.evaluate_runs)}")

    grid = math.prod(len(p.values) for p in parameters if p.kind == "grid")
    if grid * num_samples > MAX_TRIALS:
        sizes = " x ".join(str(len(p.values)) for p in parameters if p.kind == "grid")
        fail("parameters", f"the grid makes {grid * num_samples} trials ({sizes} values"
                           f"{f' x {num_samples} samples' if num_samples > 1 else ''}); at most {MAX_TRIALS}")
    # Every combination of the values a trial can get must make a valid TrainConfig: a
    # typo'd value fails now, not an hour into the sweep. Past MAX_CHECKED combinations
    # (a second or two) each value is checked on its own instead.
    names = [p.name for p in parameters]
    candidates = [p.candidates() for p in parameters]
    if math.prod(len(c) for c in candidates) <= MAX_CHECKED:
        combos = (dict(zip(names, combo)) for combo in itertools.product(*candidates))
    else:
        combos = ({name: value} for name, values in zip(names, candidates) for value in values)
    for params in combos:
        key = "parameters." + ", ".join(f"{n}={case_name(v)}" for n, v in params.items())
        _build(base_dict, {**fixed, **overrides(params)}, source, key)
    if space.scheduler and any(_build(base_dict, {**fixed, **overrides(params)}, source).max_steps is not None
                               for params in _first_combos(parameters)):
        # ASHA stops trials at epoch milestones, and a step budget's epochs depend on the data.
        fail("scheduler", "ASHA counts epochs, but trials here train a step budget (max_steps): "
                          "drop the scheduler or train by epochs")
    if space.scheduler and space.scheduler.grace_period > space.max_epochs():
        fail("scheduler.grace_period", f"{space.scheduler.grace_period} exceeds the trials' "
             f"{space.max_epochs()} epochs")
    return dataclasses.replace(space, report=_report(raw.get("report") or {}, parameters, fail),
                               compare=_compare(raw.get("compare"), parameters, fail))


def _compare(raw, parameters: tuple[Parameter, ...], fail) -> dict | None:
    """`compare: {control: {parameter: value, ...}, pair_by: seed}`: every other value of the
    control's parameters is an arm, paired with the control trial of the same seed and the same
    values of the remaining parameters. The control's values must be grid values (a case by
    its name), so every arm has its control in the sweep."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"control", "pair_by"} or not isinstance(raw.get("control"), dict) \
            or not raw["control"]:
        fail("compare", "must be {control: {parameter: the control arm's value, ...}, pair_by: seed}")
    if raw.get("pair_by", "seed") != "seed":
        fail("compare.pair_by", f"only seed pairs an arm with its control, got {quoted(raw['pair_by'])}")
    grid = {p.name: p for p in parameters if p.kind == "grid"}
    control = {}
    for name, value in raw["control"].items():
        if name not in grid:
            fail(f"compare.control.{name}", f"not a grid parameter of this space ({', '.join(grid) or 'none'})")
        shown = [case_name(v) for v in grid[name].values]
        wanted = case_name(value)
        if wanted not in shown:
            fail(f"compare.control.{name}", f"{quoted(value)} is not one of its grid values ({', '.join(shown)})")
        control[name] = wanted if grid[name].is_case else grid[name].values[shown.index(wanted)]
    return {"control": control, "pair_by": "seed"}


# ---------------------------------------------------------------- pieces
def _first_combos(parameters) -> list[dict]:
    """No parameter set, then each candidate value alone: where a key set anywhere shows."""
    return [{}] + [{p.name: v} for p in parameters for v in p.candidates()]


def _parameter(name, spec, fail) -> Parameter:
    key = f"parameters.{name}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        fail(key, f"must be one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                  f"{{loguniform: [low, high]}}; got {quoted(spec)}")
    kind, values = next(iter(spec.items()))
    key = f"{key}.{kind}"
    if kind in ("uniform", "loguniform"):
        _check_path(name, f"parameters.{name}", fail)
        if (not isinstance(values, list) or len(values) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            fail(key, f"must be [low, high] numbers, got {quoted(values)}")
        low, high = (float(v) if abs(v) <= 1e300 else math.inf for v in values)
        if not (math.isfinite(low) and math.isfinite(high)):
            fail(key, f"both ends must be finite numbers, got [{low}, {high}]")
        if not low < high:
            fail(key, f"low must be below high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            fail(key, f"a log range needs low > 0, got {low}")
        return Parameter(name, kind, low=low, high=high)
    if not isinstance(values, list) or not values:
        fail(key, f"must be a non-empty list, got {quoted(values)}")
    cases = [isinstance(v, dict) for v in values]
    if any(cases) and not all(cases):
        fail(key, "mix of mappings (cases) and plain values")
    if all(cases):
        if name in _config_paths() or name in RESULT_COLUMNS:
            fail(f"parameters.{name}", "a case parameter (values are mappings) needs a name of its own, "
                                       "not a config path or a result column")
        for i, case in enumerate(values):
            for k in case:
                if k != "name":
                    _check_path(k, f"{key}[{i}].{k}", fail)
    else:
        _check_path(name, f"parameters.{name}", fail)
    return Parameter(name, kind, values=tuple(values))


def _touches(p: Parameter, path: str) -> bool:
    return p.name == path or (p.is_case and any(path in v for v in p.values))


def _scheduler(raw, fail) -> Scheduler | None:
    return None if raw is None else _built(Scheduler, raw, "scheduler", fail)


def _search(raw, fail) -> Search:
    return _built(Search, raw or {}, "search", fail)


def _built(cls, raw, key: str, fail):
    """A config dataclass from its mapping (``frozen.from_mapping``), errors naming the key."""
    try:
        return from_mapping(cls, raw, prefix=f"{key}.")
    except ValueError as err:
        name, _, reason = str(err).partition(": ")
        fail(name, reason)


def _resources(raw, fail) -> dict:
    out = {"workers": 1, "cpus_per_worker": AUTO, "gpus": AUTO, **(raw or {})}
    for key in out:
        if key not in RESOURCE_KEYS:
            fail(f"resources.{key}", f"unknown key; known keys: {', '.join(RESOURCE_KEYS)}")
    if not _is_int(out["workers"]) or out["workers"] < 1:
        fail("resources.workers", f"must be an int >= 1, got {quoted(out['workers'])}")
    cpus = out["cpus_per_worker"]
    if cpus != AUTO and (not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or cpus <= 0):
        fail("resources.cpus_per_worker", f"must be a number > 0 or auto, got {quoted(cpus)}")
    if out["gpus"] not in (AUTO, True, False):
        fail("resources.gpus", f"must be true, false or auto, got {quoted(out['gpus'])}")
    return out


def _auto_int(value, key, fail):
    if value != AUTO and (not _is_int(value) or value < 1):
        fail(key, f"must be an int >= 1 or auto, got {quoted(value)}")
    return value


def _report(raw, parameters: tuple[Parameter, ...], fail) -> dict:
    if not isinstance(raw, dict):
        fail("report", "must be a mapping")
    for key in raw:
        if key not in REPORT_KEYS:
            fail(f"report.{key}", f"unknown key; known keys: {', '.join(REPORT_KEYS)}")
    names = [p.name for p in parameters]
    out = {"title": str(raw.get("title", "")), "x": raw.get("x", names[0]),
           "columns": raw.get("columns", ["dsc", "cpa", "recall"]), "headers": raw.get("headers") or {},
           "paper": raw.get("paper") or [],
           "paper_source": str(raw.get("paper_source", ""))}
    if out["x"] not in names:
        fail("report.x", f"{quoted(out['x'])} is not a parameter of this space ({', '.join(names)})")
    if not isinstance(out["columns"], list):
        fail("report.columns", "must be a list")
    for column in out["columns"]:
        if column not in RESULT_COLUMNS and column not in names and column not in _config_paths():
            fail(f"report.columns.{column}", f"unknown column; a parameter, a config path or one of "
                                             f"{', '.join(RESULT_COLUMNS)}")
    if not isinstance(out["headers"], dict):
        fail("report.headers", "must be a mapping of column to header")
    for key in out["headers"]:
        if key not in names and key not in out["columns"]:
            fail(f"report.headers.{key}", "neither a parameter nor a column of report.columns")
    if not isinstance(out["paper"], list):
        fail("report.paper", "must be a list of rows")
    for i, row in enumerate(out["paper"]):
        if not isinstance(row, dict):
            fail(f"report.paper[{i}]", "must be a mapping")
        for key, value in row.items():
            if key not in names and key not in out["columns"] and key not in PAPER_SETTING:
                fail(f"report.paper[{i}].{key}", "neither a parameter, a column of report.columns nor one of "
                                                 f"the paper's settings ({', '.join(PAPER_SETTING)})")
            if key not in names and not (isinstance(value, (int, float)) and math.isfinite(value)):
                fail(f"report.paper[{i}].{key}", f"a published value must be a number, got {quoted(value)}")
    return out


# A space's words beyond TrainConfig's keys: which code trains a trial, and nnU-Net's length.
TRIAL_KEYS = {"trainer", "nnunet_iterations"}


def _config_paths() -> set[str]:
    top = (set(typing.get_type_hints(TrainConfig)) - {"model"}) | TRIAL_KEYS
    return top | {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}


def _check_path(path: str, key: str, fail) -> None:
    if not isinstance(path, str) or path not in _config_paths():
        fail(key, f"unknown parameter {quoted(path)}: not a training config path (e.g. label_fraction, "
                  f"model.recurrence; see configs/*.yaml)")


def _build(base: dict, changes: dict, source, key: str = "config") -> TrainConfig | NnunetConfig:
    """base (TrainConfig.to_dict()) with dotted-path changes -> a validated TrainConfig, or
    with ``trainer: nnunet`` an NnunetConfig (``NnunetConfig.from_training_keys``)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for path, value in changes.items():
        if path.startswith("model."):
            data["model"][path.split(".", 1)[1]] = value
        else:
            data[path] = value
    trainer = data.pop("trainer", "bonescan")
    iterations = data.pop("nnunet_iterations", None)
    try:
        if trainer not in TRAINERS:
            raise InputError(source, f"trainer: invalid value {trainer!r} (one of {', '.join(TRAINERS)})")
        if trainer == "nnunet":
            return NnunetConfig.from_training_keys({**data, **({} if iterations is None else
                                                               {"nnunet_iterations": iterations})}, source)
        if iterations is not None:
            raise InputError(source, "nnunet_iterations: only a trainer: nnunet case trains nnU-Net")
        return TrainConfig.from_dict(data, source)
    except InputError as err:
        raise InputError(source, f"{key}: {err.reason}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
