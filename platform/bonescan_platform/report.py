"""`bonescan report`: one self-contained HTML page for an experiment (`bonescan tune`) or a run.

Everything is inside the page: figures are PNGs (matplotlib, Agg, no pyplot state) embedded as
base64, so the file can be mailed or archived as it is. An experiment's page has its table in
the paper's layout with the published numbers beside the measured ones, DSC / CPA / Recall
against the swept parameter, the training curves of every trial and a Figure-10-style panel
(test scans, manual labels, each configuration's prediction). A run's page has its training
curves, its scores and a few test predictions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from bonescan_model.burden import burden, skeleton_mask
from bonescan_model.engine import predict_masks
from bonescan_model.errors import InputError
from bonescan_model.metrics import dsc as dice
from bonescan_model.inference import display_norm
from bonescan_platform.search_space import RESULT_COLUMNS, SearchSpace, case_name
from bonescan_platform.stream import crops as split_crops
from bonescan_model.train_config import NnunetConfig
from bonescan_platform import storage
from bonescan_platform.runs import CONFIG, EXPERIMENT, HISTORY_CSV, HISTORY_JSON, RUN_NAME, TUNE_NAME, Experiment, Run

METRICS = ("dsc", "cpa", "recall")
METRIC_NAMES = {"dsc": "DSC", "cpa": "CPA", "recall": "Recall"}  # as the paper writes them
PANEL_SCANS = 3
PANEL_MODELS = 6  # columns of predictions in the Figure-10 panel: the best configurations past that
LABEL_COLOR, PREDICTION_COLOR = "#00b000", "#e00000"
# Headers of the config paths the paper's tables show.
CONFIG_HEADERS = {"label_fraction": "L_label (share)", "model.recurrence": "t", "dataset": "data set",
                  "model.dilated": "dilated conv.", "model.inception": "inception",
                  "model.residual": "residual unit", "model.aggregation": "aggregation", "model.arch": "model"}
# The paper's own setting where a space's paper row does not state it: Table 1 (112 original
# images in D1), Table 2 (400 epochs; no batch size is given, so no step count).
PAPER_DEFAULTS = {"all_scans": 112, "epochs": 400}
DIFFERS = "differs from the paper's arm"
PAPER_NOTE = ("Paper: the numbers Lin et al. (2022) published, measured on their private clinical scans "
              "(Gansu Provincial Hospital, 400 epochs, GPUs); shown for orientation, not comparable one "
              "to one with scores measured here.")
# Categorical colours that stay apart for the few configurations a sweep has.
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22")


def report(target: str, out: str) -> int:
    """`bonescan report`: target and out local or URIs (``storage``). A target in object storage
    is read through a local copy of what the report reads (not Ray's checkpoints)."""
    if storage.is_uri(out):
        if storage.is_dir(out):
            raise InputError(out, "is a folder; give the report's file name, e.g. report.html")
    else:
        out_path = Path(out)
        if out_path.is_dir():
            raise InputError(out_path, "is a folder; give the report's file name, e.g. report.html")
        if out_path.parent.exists() and not out_path.parent.is_dir():
            raise InputError(out_path.parent, "is a file, not a folder to write the report in")
    shown = storage.absolute(target)
    if storage.is_uri(shown):
        for marker in (EXPERIMENT, HISTORY_JSON):
            if storage.is_file(storage.join(shown, marker)):
                break
        else:
            raise InputError(shown, _NEITHER)
        with storage.fetched(shown, keep=_read_by_report) as local:
            page = _page_of(local, shown)
    else:
        page = _page_of(Path(shown), shown)
    if storage.is_uri(out):
        storage.write_text(out, page)
        print(f"report: {out} ({len(page.encode()) / 1e6:.1f} MB, self-contained)")
        return 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_path)
    except OSError as err:
        raise InputError(out_path, f"cannot write the report ({err.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)  # nothing half-written is left beside the report
    print(f"report: {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, self-contained)")
    return 0


_NEITHER = (f"neither an experiment folder ({EXPERIMENT}, from `bonescan tune`) nor a run "
            f"folder ({HISTORY_JSON} and {CONFIG}, from `bonescan train`)")


def _page_of(path: Path, shown: str) -> str:
    if Experiment.is_experiment(path):
        return experiment_page(path, shown)
    if Run.is_run(path):
        return run_page(Run(path), shown)
    raise InputError(shown, _NEITHER)


def _read_by_report(relative: str) -> bool:
    """What a report reads of a folder in object storage: everything but Ray's own folders
    (a run's or a trial's ``train/`` checkpoints, a sweep's ``tune/`` state)."""
    parts = relative.split("/")
    return not any(part in (RUN_NAME, TUNE_NAME) for part in parts[:-1])


# ---------------------------------------------------------------- an experiment
def experiment_page(root: Path, shown: str | None = None) -> str:
    exp = Experiment.open(root)
    rows = exp.results()
    if rows is None:
        raise InputError(root, "no results.parquet yet: the sweep has not finished (continue it with "
                               "`bonescan tune ... --resume`)")
    space = exp.space
    groups = configurations(rows, space)
    spec = space.report
    title = spec["title"] or f"Sweep {Path(exp.record['space']).name}"
    statuses = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in sorted({r["status"] for r in rows}))
    body = [
        f"<h1>{_e(title)}</h1>",
        _facts([("experiment", shown or str(root)), ("space", exp.record["space"]), ("data", str(exp.data)),
                ("started", exp.record.get("created", "")), ("trials", f"{len(rows)} ({statuses})"),
                ("metric", f"{space.metric} ({space.mode})"),
                ("splits", "train / val / test by patient; validation (val_*) chose each trial's kept model "
                           "and drove ASHA; the test split was scored once per trial, on its kept model"),
                ("test scores", "per-image means over the lesion-bearing test scans (lesion-free scans count "
                                "by their false positives); 'protocol': the paper's runs averaged, run 0 as is, "
                                "run k a seeded flip/rotation/shift"),
                ("seeds", ", ".join(str(s) for s in sorted({r['seed'] for r in rows})))]),
        "<h2>Table</h2>", paper_table(groups, space),
        f"<p class='note'>{_e(PAPER_NOTE)} {_e(spec['paper_source'])}</p>" if spec["paper"] or spec["paper_source"]
        else "",
        f"<h2>DSC, CPA and Recall against {_e(_header(spec['x'], spec))}</h2>",
        _img(metric_figure(groups, space), "metrics against the swept parameter"),
        "<h2>Training curves</h2>",
        _img(training_figure(groups, exp), "training curves of every trial"),
        "<h2>Test scans: manual label and each configuration's prediction</h2>",
        f"<p class='note'>The {PANEL_MODELS} configurations with the best DSC.</p>" if len(groups) > PANEL_MODELS
        else "",
        prediction_panel(exp.data, [(g["label"], exp.trial_run(g["rows"][0]["trial_id"])) for g in panel_groups(groups)]),
        *comparisons_section(exp.comparisons()),
        "<h2>Every trial</h2>", trials_table(rows, space),
    ]
    return _page(title, body)


def comparisons_section(table: list[dict]) -> list[str]:
    """Each arm against its control (comparisons.py), with the verdict its interval allows."""
    if not table:
        return []
    head = ["arm", "where", "paired seeds", "arm test DSC", "control test DSC", "difference", "95 % CI (t)",
            "95 % CI (bootstrap: seeds and images)", "p", "seeds for 80 % power at 0.03", "verdict"]
    body = []
    for row in table:
        cells = [_e(row["arm"]), _e(row["where"] or "-"), str(row["n"]), _fmt3(row["arm_mean"]),
                 _fmt3(row["control_mean"]), _fmt3(row["mean_diff"], signed=True),
                 f"{_fmt3(row['ci95_low'], signed=True)} to {_fmt3(row['ci95_high'], signed=True)}",
                 f"{_fmt3(row['boot95_low'], signed=True)} to {_fmt3(row['boot95_high'], signed=True)}",
                 _fmt3(row["p_value"]), str(row["seeds_for_power"]) if row["seeds_for_power"] > 0 else "n/a",
                 f"<b>{_e(row['verdict'])}</b>"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    control = table[0]["control"]
    return [
        f"<h2>Against the control ({_e(control)}), paired by seed</h2>",
        "<table id='comparisons-table'><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{''.join(body)}</tbody></table>",
        f"<p class='note'>{_e(VERDICT_RULE)} Test split, kept model, run 0; comparisons.csv holds this "
        "table.</p>",
    ]


VERDICT_RULE = ("Verdicts: better where the 95 % interval of the paired difference lies above 0, worse where "
                "it lies below 0, 'no gain of 0.03' where the 90 % interval's upper bound is below 0.03, "
                "otherwise inconclusive, with about how many more paired seeds 80 % power at 0.03 needs.")


def _fmt3(value, signed: bool = False) -> str:
    if not _finite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def configurations(rows: list[dict], space: SearchSpace) -> list[dict]:
    """Trials grouped by their parameter values (seeds pooled), in the order the table shows:
    by the x parameter when it is numeric, else as the sweep ran them."""
    groups: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        key = tuple(row[name] for name in space.names)
        group = groups.setdefault(key, {"params": dict(zip(space.names, key)), "rows": [],
                                        "label": ", ".join(f"{_header(n, space.report)} {_value(n, v)}"
                                                           for n, v in zip(space.names, key))})
        group["rows"].append(row)
    ordered = list(groups.values())
    x = space.report["x"]
    if all(_is_number(g["params"][x]) for g in ordered):
        ordered.sort(key=lambda g: g["params"][x])
    for i, group in enumerate(ordered):
        group["color"] = COLORS[i % len(COLORS)]
    return ordered


def panel_groups(groups: list[dict]) -> list[dict]:
    """The configurations whose predictions the panel shows: all, or the PANEL_MODELS best by
    DSC, in table order."""
    if len(groups) <= PANEL_MODELS:
        return groups
    best = sorted(groups, key=lambda g: -np.nan_to_num(_mean(g["rows"], "dsc"), nan=-1.0))[:PANEL_MODELS]
    return [g for g in groups if any(g is b for b in best)]


def paper_table(groups: list[dict], space: SearchSpace) -> str:
    spec = space.report
    columns = [n for n in space.names if n not in spec["columns"]] + list(spec["columns"])
    published = {c for row in spec["paper"] for c in row if c in spec["columns"] and c not in space.names}
    best = {c: max((_mean(g["rows"], c) for g in groups), default=float("nan")) for c in METRICS}
    head1, head2 = [], []
    for c in columns:
        if c in published:
            head1.append(f"<th colspan='2'>{_e(_header(c, spec))}</th>")
            head2 += ["<th>measured</th>", "<th class='paper'>paper</th>"]
        else:
            head1.append(f"<th rowspan='2'>{_e(_header(c, spec))}</th>")
    if spec["paper"]:
        head1.append(f"<th rowspan='2'>{_e(DIFFERS)}</th>")
    lines = []
    matched = set()
    for group in groups:
        paper = next((i for i, p in enumerate(spec["paper"]) if _matches(p, group["params"], space)), None)
        if paper is not None:
            matched.add(paper)
        cells = []
        for c in columns:
            cells.append(_cell(group, c, space, bold=c in METRICS and _mean(group["rows"], c) == best[c]))
            if c in published:
                cells.append(_paper_cell(spec["paper"][paper] if paper is not None else {}, c))
        if spec["paper"]:
            notes = differences(group["rows"], spec["paper"][paper]) if paper is not None else ["no published number"]
            cells.append(f"<td class='differs'>{'<br>'.join(_e(n) for n in notes)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    for i, paper in enumerate(spec["paper"]):  # published rows with no trial here (nnU-Net)
        if i in matched:
            continue
        cells = []
        for c in columns:
            cells.append(f"<td>{_e(_value(c, paper[c]))}</td>" if c in space.names and c in paper
                         else "<td class='none'>not run</td>")
            if c in published:
                cells.append(_paper_cell(paper, c))
        cells.append("<td class='none'>not run here</td>")
        lines.append("<tr class='paper-only'>" + "".join(cells) + "</tr>")
    return (f"<table id='paper-table'><thead><tr>{''.join(head1)}</tr><tr>{''.join(head2)}</tr></thead>"
            f"<tbody>{''.join(lines)}</tbody></table>"
            "<p class='note'>Measured: mean over the configuration's trials (± standard deviation over seeds "
            "when there are several). Bold: the best measured score.</p>")


def _cell(group: dict, column: str, space: SearchSpace, bold: bool = False) -> str:
    rows = group["rows"]
    if column in space.names:
        return f"<td>{_e(_value(column, group['params'][column]))}</td>"
    if column not in RESULT_COLUMNS:  # a config path: the same in every trial of the group
        config = json.loads(rows[0]["config"])
        # An nnU-Net trial's config has no model keys (nnU-Net plans its own): n/a there.
        value = (config.get("model") or {}).get(column[6:]) if column.startswith("model.") else config.get(column)
        return "<td class='none'>n/a</td>" if value is None else f"<td>{_e(_value(column, value))}</td>"
    values = [r[column] for r in rows if _finite(r[column])]
    if not values:
        return "<td class='none'>n/a</td>"
    text = _format(column, float(np.mean(values)))
    if len(values) > 1 and column in METRICS:
        text += f" ± {float(np.std(values)):.3f}"
    return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"


def differences(rows: list[dict], paper: dict) -> list[str]:
    """Where a measured arm (its trials' ``rows``) differs from the paper's arm it sits beside:
    its data, its labels and its training length, each with the paper's value, so that a reader
    never compares unlike with unlike without being told. The paper's values: the row's own
    (search_space.PAPER_SETTING keys), else PAPER_DEFAULTS."""
    paper = {**PAPER_DEFAULTS, **paper}
    notes = [f"data: {_count(rows, 'all_scans')} scans of this experiment's cohort, not the paper's "
             f"{paper['all_scans']:,} clinical images"]
    for key, what in (("training_samples", "training samples"), ("labeled_samples", "labeled samples"),
                      ("labeled_scans", "labeled scans"), ("labeled_share_of_all", "labeled share of all scans")):
        ours = _mean(rows, key)
        if key in paper and not (_finite(ours) and math.isclose(ours, paper[key], rel_tol=0.005)):
            text = (lambda v: f"{v:.0%}") if key.startswith("labeled_share") else (lambda v: f"{v:,.0f}")
            notes.append(f"{what}: {text(ours) if _finite(ours) else 'n/a'} (paper {text(paper[key])})")
    paper_steps = f", {paper['steps']:,} steps" if "steps" in paper else ", steps not stated"
    notes.append(f"training: {_count(rows, 'steps')} optimizer steps, {_count(rows, 'epochs')} epochs "
                 f"(paper {paper['epochs']:,} epochs{paper_steps})")
    return notes


def _count(rows: list[dict], key: str) -> str:
    """A count over a configuration's trials: one number, or their range where seeds differ."""
    values = sorted({int(r[key]) for r in rows if _finite(r.get(key)) and r[key] >= 0})
    if not values:
        return "n/a"
    return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}-{values[-1]:,}"


def _paper_cell(paper: dict, column: str) -> str:
    if column not in paper:
        return "<td class='paper none'></td>"
    value = paper[column]
    text = f"{value:.3f}" if column in METRICS or column == "parameters" else _format(column, value, paper=True)
    return f"<td class='paper'>{text}</td>"


def _matches(paper: dict, params: dict, space: SearchSpace) -> bool:
    keys = [k for k in paper if k in space.names]
    return bool(keys) and all(_same(paper[k], params[k]) for k in keys)


def _same(a, b) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def trials_table(rows: list[dict], space: SearchSpace) -> str:
    columns = ["trial_id", "label", "seed", "status", "epochs", "labeled_scans", "labeled_share_of_all",
               "best_val_dsc", "dsc", "cpa", "recall", "lesion_sensitivity", "fp_per_image", "protocol_dsc",
               "parameters", "test_seconds", "train_seconds", "trial_seconds"]
    head = "".join(f"<th>{_e(RESULT_COLUMNS.get(c, c.replace('_', ' ')))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row[c]
            cells.append(f"<td>{_format(c, value) if _is_number(value) else _e(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table id='trials-table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<p class='note'>Every trial is a run folder under runs/ ({CONFIG}, {HISTORY_CSV}, model.pt); "
            "results.parquet and results.csv hold this table with every column and each trial's config.</p>")


# ---------------------------------------------------------------- figures
def metric_figure(groups: list[dict], space: SearchSpace) -> Figure:
    spec = space.report
    x = spec["x"]
    kinds = {p.name: p.kind for p in space.parameters}
    kind = kinds[x]
    # One series per value of the other grid / choice parameters; drawn ones pool into one.
    others = [n for n in space.names if n != x and kinds[n] in ("grid", "choice")]
    numeric = all(_is_number(g["params"][x]) for g in groups)
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    series: dict[tuple, list[dict]] = {}
    for group in groups:
        series.setdefault(tuple(group["params"][n] for n in others), []).append(group)
    categories = [_value(x, g["params"][x]) for g in groups]
    categories = list(dict.fromkeys(categories))
    width = 0.8 / max(1, len(series))
    for ax, metric in zip(axes, METRICS):
        for s, (key, members) in enumerate(series.items()):
            label = ", ".join(f"{_header(n, spec)} {_value(n, v)}" for n, v in zip(others, key)) or "measured"
            means = [_mean(g["rows"], metric) for g in members]
            stds = [_std(g["rows"], metric) for g in members]
            color = COLORS[s % len(COLORS)]
            if numeric:
                xs = [float(g["params"][x]) for g in members]
                style = "o" if kind in ("uniform", "loguniform") else "o-"
                ax.errorbar(xs, means, yerr=stds, fmt=style, color=color, capsize=3, label=label)
            else:
                xs = [categories.index(_value(x, g["params"][x])) + (s - (len(series) - 1) / 2) * width
                      for g in members]
                ax.bar(xs, means, width=width, yerr=stds, color=color, capsize=3, label=label)
        paper = [(p[x], p[metric]) for p in spec["paper"] if x in p and metric in p]
        if paper:
            xs = ([float(v) for v, _ in paper] if numeric else
                  [categories.index(_value(x, v)) if _value(x, v) in categories else None for v, _ in paper])
            points = [(a, b) for a, (_, b) in zip(xs, paper) if a is not None]
            if points:
                ax.plot(*zip(*points), "D", markerfacecolor="none", markeredgecolor="black", markersize=7,
                        linestyle="none", label="paper (their data)")
        if kind == "loguniform":
            ax.set_xscale("log")
        if x == "label_fraction":
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_title(METRIC_NAMES[metric])
        ax.set_xlabel(_header(x, spec))
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def training_figure(groups: list[dict], exp: Experiment) -> Figure:
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    panels = (("train_loss", "training loss"), ("val_dsc", "validation DSC"), ("val_recall", "validation Recall"))
    for group in groups:
        for i, row in enumerate(group["rows"]):
            history = exp.trial_run(row["trial_id"]).history  # the folder may have moved since the sweep
            for ax, (key, _title) in zip(axes, panels):
                points = [(h["epoch"], h[key]) for h in history if key in h]
                if points:
                    ax.plot(*zip(*points), "-", color=group["color"], alpha=0.9 if i == 0 else 0.5,
                            label=group["label"] if i == 0 else None)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key.startswith("val_"):
            ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def prediction_panel(data: str | Path, models: Sequence[tuple[str, Run]]) -> str:
    """Figure 10 of the paper: rows of test scans; columns: the scan, its manual label and each
    model's prediction (lesion outlines; in the titles the burden of each mask, and DSC of that
    scan for a prediction)."""
    try:
        crops = split_crops(data, "test")
    except (InputError, OSError) as err:
        return f"<p class='note'>No test scans to show: {_e(str(err))}</p>"
    picks = _pick_scans(crops["mask"][:, 0])
    if not picks:
        return "<p class='note'>The test split has no labeled scan to show.</p>"
    images, truths = crops["image"][picks], crops["mask"][picks, 0] > 0.5
    spacings = crops["pixel_spacing_mm"][picks]
    predictions = []
    for label, run in models:
        if run.model_path.is_file():
            trained = run.kept_model()
            masks = predict_masks(trained.model, torch.from_numpy(images), trained.threshold).numpy()  # (B, H, W) bool
            predictions.append((label, masks, dice(masks, truths)))
    cols = 2 + len(predictions)
    fig = _figure(2.8 * cols, 3.0 * len(picks) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(picks), cols, squeeze=False))
    for r, (image, truth, spacing) in enumerate(zip(images, truths, spacings)):
        ant = image[0]
        norm = display_norm(ant)
        skeleton = skeleton_mask(ant)  # one per scan: label and predictions differ by their lesions only
        panels = [("scan (ANT)", None), ("manual label\n" + _burden_title(truth, ant, spacing, skeleton), truth)]
        panels += [(f"{label}\nDSC {scores[r]:.2f}\n{_burden_title(pred[r], ant, spacing, skeleton)}", pred[r])
                   for label, pred, scores in predictions]
        for c, (title, mask) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(ant, cmap="gray_r", norm=norm, interpolation="nearest")
            if mask is not None and mask.any():
                # Lesions are a few pixels wide: filled, and outlined a pixel out, to be seen at all.
                color = LABEL_COLOR if c == 1 else PREDICTION_COLOR
                ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([color]), alpha=0.6,
                          interpolation="nearest")
                ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c >= 1:  # every row's burden: the label's and each prediction's
                ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(f"test scan {picks[r] + 1}", fontsize=8)
    fig.tight_layout()
    return (_img(fig, "test scans with manual labels and predictions") +
            "<p class='note'>Thoracic crops shown inverted (hot = dark); green: the manual label, red: a "
            "model's prediction. Titles: each mask's burden in the crop (lesions, lesion area, share of the "
            "skeleton segmented from the crop's counts; docs/design.md, \"Burden per scan\"). Scans chosen by "
            "lesion area: the largest, the median and the smallest (scans without a lesion fill in when fewer "
            "have one).</p>")


def _burden_title(mask: np.ndarray, ant: np.ndarray, spacing: float, skeleton: np.ndarray) -> str:
    """One mask's burden in the crop, for a panel's title (``bonescan_model.burden``)."""
    b = burden(mask, ant, float(spacing), skeleton=skeleton)
    return (f"{b.lesions} lesion{'s' if b.lesions != 1 else ''}, {b.lesion_area_cm2:.2f} cm², "
            f"{100 * b.skeleton_share:.2f} % of skeleton")


def _pick_scans(masks: np.ndarray) -> list[int]:
    """Up to PANEL_SCANS test scans: by lesion area the largest, the median and the smallest;
    scans without a lesion fill in (a false positive shows there) when fewer have one."""
    areas = masks.reshape(len(masks), -1).sum(1)
    lesions = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
    if len(lesions) > PANEL_SCANS:
        return [lesions[0], lesions[len(lesions) // 2], lesions[-1]]
    return lesions + [i for i in range(len(masks)) if areas[i] == 0][:PANEL_SCANS - len(lesions)]


# ---------------------------------------------------------------- a single run
def run_page(run: Run, shown: str | None = None) -> str:
    cfg, history, record = run.config, run.history, run.record
    data = record.data if record else None
    best = max(history, key=lambda h: h.get("val_dsc", -1.0))
    last = history[-1]
    if isinstance(cfg, NnunetConfig):
        about = [("model", f"nnU-Net v2, its own plans; views: {cfg.views}"),
                 ("training", f"{last['epoch']} of {cfg.epochs} epochs of {cfg.iterations} iterations, "
                              f"L_label {cfg.label_fraction:.0%}, data set {cfg.dataset}, seed {cfg.seed}")]
    else:
        model = cfg.model
        about = [("model", f"{model.arch}, width {model.width}, t = {model.recurrence} ({model.recurrent_weights}), "
                           f"aggregation {model.aggregation}"),
                 ("training", f"{last['epoch']} of {cfg.epochs} epochs, lr {cfg.lr}, alpha {cfg.alpha}, nu {cfg.nu}, "
                              f"{cfg.supervised}, L_label {cfg.label_fraction:.0%}, data set {cfg.dataset}, seed {cfg.seed}")]
    facts = [("run", shown or str(run.root)), ("data", data or "unknown"), *about]
    head = "".join(f"<th>{h}</th>" for h in ("", "epoch", *METRIC_NAMES.values(), "training loss"))
    tested = run.any_test_score
    rows = "".join(
        f"<tr><td>{name}</td><td>{h['epoch']}</td>" + "".join(
            f"<td>{_format(k, h.get('val_' + k, float('nan')))}</td>" for k in METRICS) +
        f"<td>{h.get('train_loss', float('nan')):.4f}</td></tr>"
        for name, h in (("kept model (best validation DSC), validation split", best),
                        ("last epoch, validation split", last)))
    if tested and tested.get("images"):
        rows += (f"<tr><td>kept model on the test split ({tested['lesion_images']} lesion-bearing of "
                 f"{tested['images']} scans), scored once</td><td>{best['epoch']}</td>"
                 + "".join(f"<td>{tested[k]:.3f}</td>" for k in METRICS) + "<td></td></tr>")
        rows += (f"<tr><td>kept model on the test split, the paper's {len(tested['runs'])} runs "
                 f"(mean ± std over runs)</td><td>{best['epoch']}</td>"
                 + "".join(f"<td>{tested['runs_mean'][k]:.3f} ± {tested['runs_std'][k]:.3f}</td>" for k in METRICS)
                 + "<td></td></tr>")
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "train_unsupervised", "train_supervised"):
        if all(key in h for h in history):
            axes[0].plot(epochs, [h[key] for h in history], "-", label=key[6:])
    axes[0].set_yscale("log")
    for metric in METRICS:
        if all(f"val_{metric}" in h for h in history):
            axes[1].plot(epochs, [h[f"val_{metric}"] for h in history], "-", label=METRIC_NAMES[metric])
    axes[2].plot(epochs, [h.get("train_seconds", float("nan")) for h in history], "-", label="epoch seconds")
    for ax, title in zip(axes, ("training loss", "validation scores", "seconds per epoch")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_ylim(0, 1.05)
    fig.tight_layout()
    body = [f"<h1>Training run {_e(run.name)}</h1>", _facts(facts),
            "<h2>Scores: validation split (chooses the kept model) and test split (scored once)</h2>",
            _budget_line(run),
            f"<table id='run-table'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>",
            "<h2>Training curves</h2>", _img(fig, "training curves"),
            "<h2>Test scans: manual label and prediction</h2>",
            prediction_panel(data, [("prediction", run)]) if data else
            "<p class='note'>The run records no data: no test scans to show.</p>"]
    return _page(f"Run {run.name}", body)


def _budget_line(run: Run) -> str:
    budget = run.budget
    if not budget:
        return ""
    return (f"<p class='note' id='budget'>Label budget: {budget['labeled_scans']} labeled original scans of "
            f"{budget['labeled_patients']} patients, of {budget['train_scans']} training scans "
            f"({budget['labeled_share_of_train']:.0%}); {budget['labeled_share_of_all']:.0%} of all "
            f"{budget['all_scans']} scans (the paper's L_label counts this way). Validation: "
            f"{budget['val_scans']} scans of {budget['val_patients']} patients; test: {budget['test_scans']} "
            f"scans of {budget['test_patients']} patients.{_training_sentence(run, budget)}</p>")


def _training_sentence(run: Run, budget: dict) -> str:
    """Samples and optimizer steps: what makes two runs' training comparable, or not."""
    history = run.history
    if "training_samples" not in budget or not history:
        return ""
    last = history[-1]
    return (f" Training: {budget['training_samples']} samples ({budget['labeled_samples']} labeled; "
            f"{budget['samples_per_scan']} per scan), {last.get('steps', 'n/a')} optimizer steps over "
            f"{last['epoch']} epochs, {last.get('samples', 'n/a')} samples seen.")


# ---------------------------------------------------------------- HTML and formatting
STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: center; }
th { background: #f3f3f3; } td.paper, th.paper { background: #fff7e0; color: #6a4a00; }
td.none { color: #999; } tr.paper-only td { font-style: italic; }
td.differs { font-size: 0.8em; color: #444; max-width: 28em; }
table.facts td { text-align: left; border: none; padding: 0.1em 0.8em 0.1em 0; }
table.facts td:first-child { color: #666; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 0.85em; max-width: 60em; }
footer { margin-top: 3em; color: #888; font-size: 0.8em; }
"""

# The page checks its own images: a browser (or a test driving a headless one) reads the count.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.getElementById("images-loaded").textContent = String(loaded);
});
"""


def _page(title: str, body: list[str]) -> str:
    text = "\n".join(part for part in body if part)
    images = text.count("<img ")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{text}\n"
            f"<footer>bonescan report. Images loaded: <span id='images-loaded'>not checked</span> of "
            f"<span id='images-total'>{images}</span>.</footer>"
            f"<script>{SCRIPT}</script></body></html>\n")


def _facts(items: list[tuple[str, str]]) -> str:
    return "<table class='facts'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in items) + "</table>"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _header(column: str, spec: dict) -> str:
    return spec.get("headers", {}).get(column) or RESULT_COLUMNS.get(column) or CONFIG_HEADERS.get(column) or column


def _value(column: str, value) -> str:
    if isinstance(value, bool):
        return "✓" if value else "—"
    if column == "label_fraction" and _is_number(value):
        return f"{float(value):.0%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return case_name(value)


def _format(column: str, value: float, paper: bool = False) -> str:
    if not _finite(value):
        return "n/a"
    if column == "parameters":
        return f"{value:.3f}" if paper else f"{value / 1e6:.3f}"
    if column in ("dsc", "cpa", "recall", "pooled_dsc", "lesion_sensitivity", "best_val_dsc", "final_val_dsc") \
            or column.startswith("protocol_"):
        return f"{value:.3f}"
    if column.startswith("labeled_share"):
        return f"{value:.0%}"
    if column.endswith("seconds") or column.endswith("fp_per_image"):
        return f"{value:.2f}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def _mean(rows: list[dict], column: str) -> float:
    values = [r[column] for r in rows if _finite(r.get(column))]
    return float(np.mean(values)) if values else float("nan")


def _std(rows: list[dict], column: str) -> float:
    values = [r[column] for r in rows if _finite(r.get(column))]
    return float(np.std(values)) if len(values) > 1 else 0.0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
