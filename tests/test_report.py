"""`bonescan report`: self-contained HTML that a real browser (headless Chromium) renders whole.

The experiments here are laid out as `bonescan tune` lays them out, without training: each
trial's run folder holds a freshly initialized model of its config and a made-up history,
and `tune.collect` scores the models and writes the results table, as after a sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from skimage import io as skio

from bonescan_model.checkpoint import save_checkpoint
from bonescan_model.network import ModelConfig, build_model
from bonescan_platform import nnunet_baseline, scoring, splits, stream, tune
from bonescan_platform.cli import main
from bonescan_platform.runs import Experiment, Plan, Run, RunRecord, Trial

pytestmark = pytest.mark.ray  # experiments are laid out on shards that Ray ingests

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path(__file__).parent / "_output"
CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium is not installed (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def data(cohort):
    return cohort(8, 11)


def laid_out_experiment(root: Path, data: Path, space_file: str, seeds: int = 2) -> Path:
    """An experiment folder of the space `tune_spaces/<space_file>`: one trial per grid point and
    seed (``seeds`` of them), each with its splits, label budget, checkpoint and history."""
    exp = Experiment.create(root, data, REPO / "tune_spaces" / space_file)
    exp = exp.save_resource_plan(Plan(trials=1, workers=1, cpu_per_worker=1.0, gpus=False))
    names = [p.name for p in exp.space.parameters]
    grid = list(itertools.product(*(p.values for p in exp.space.parameters)))
    for i, (values, seed) in enumerate(itertools.product(grid, range(seeds))):
        params = {**dict(zip(names, values)), "seed": seed}
        cfg = exp.space.trial_config(params)
        torch.manual_seed(i)
        if cfg.trainer == "nnunet":  # as nnunet_baseline leaves it: no model.pt, its test score written
            run = Run.create(exp.runs / f"laidout_{i:05d}", cfg, RunRecord(data=str(data), trainer="nnunet"))
            selection = nnunet_baseline.selection_for(str(data), cfg)
            body = scoring.score_runs(build_model(ModelConfig(width=4, recurrence=1)), stream.crops(data, "test"), 1)
            run.write_test_score({"split": "test", **body, "model": "nnU-Net v2", "parameters": 2_000_000})
        else:
            # A space's step budget, cut to a few steps: a laid-out history has a row per epoch.
            cfg = dataclasses.replace(cfg, test_runs=2, **({"max_steps": 6} if cfg.max_steps else {}))
            run = Run.create(exp.runs / f"laidout_{i:05d}", cfg, RunRecord(data=str(data)))
            selection = splits.for_config(data, cfg)
            save_checkpoint(run.model_path, build_model(cfg.model), cfg.model, epoch=cfg.epochs,
                            threshold=cfg.threshold)
        run.write_trial(Trial(trial_id=run.name, params=params, label=tune.trial_label(params)))
        run.save_selection(selection)
        plan = {k: selection.budget[f"planned_{k}"] for k in ("epochs", "steps_per_epoch", "steps")}
        history = []
        for epoch in range(1, plan["epochs"] + 1):
            steps = min(epoch * plan["steps_per_epoch"], plan["steps"])
            history.append({"epoch": epoch, "steps": steps, "samples": steps * 4,
                            "train_loss": 1.0 / (epoch + i), "train_seconds": 3.0,
                            "val_dsc": epoch / (plan["epochs"] + i), "val_cpa": 0.2, "val_recall": 0.3})
        run.write_history(history)
    rows = tune.collect(root)
    assert len(rows) == len(grid) * seeds and all(r["status"] == "finished" for r in rows)
    assert sorted({r["seed"] for r in rows}) == list(range(seeds))
    return root


def chromium(page: Path, *args: str, tmp_path: Path) -> str:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    done = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def check_in_browser(page: Path, tmp_path: Path, screenshot_name: str) -> str:
    """Every image decoded, then a screenshot (kept in tests/_output to look at); -> the DOM."""
    text = page.read_text()
    sources = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), "an image is not embedded"
    assert not re.search(r"(src|href)=['\"]https?:", text), "the page loads something from outside"

    dom = chromium(page, "--dump-dom", "--virtual-time-budget=5000", tmp_path=tmp_path)
    loaded = re.search(r"id=\"images-loaded\">(\d+)<", dom)
    assert loaded, "the page's image check did not run"
    assert int(loaded.group(1)) == len(sources)

    shot = tmp_path / "shot.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1280,3200", "--hide-scrollbars", tmp_path=tmp_path)
    pixels = skio.imread(shot)
    assert pixels.shape[:2] == (3200, 1280) and pixels.std() > 10, "the screenshot is blank"
    OUTPUT.mkdir(exist_ok=True)
    shutil.copy(shot, OUTPUT / screenshot_name)
    return dom


@pytest.fixture(scope="module")
def baselines(data, tmp_path_factory):  # Table 6: a case parameter (nnU-Net's trial laid out as the others)
    return laid_out_experiment(tmp_path_factory.mktemp("baselines") / "exp", data, "baselines.yaml")


@pytest.fixture(scope="module")
def label_fraction(data, tmp_path_factory):  # Fig. 7: a numeric x, the paper's point at 37 %
    return laid_out_experiment(tmp_path_factory.mktemp("label_fraction") / "exp", data, "label_fraction.yaml")


@needs_chromium
@pytest.mark.parametrize("experiment, expected", [
    ("baselines", ["U-Net", "Proposed", "Proposed, supervised only", "nnU-Net", "0.757", "Model"]),
    ("label_fraction", ["37%", "0.683", "0.715", "0.601", "labeled share of training scans",
                        "L_label (share of all scans)"]),
])
def test_experiment_report_opens_in_a_browser_with_its_tables_and_pictures(request, tmp_path, experiment, expected):
    exp = request.getfixturevalue(experiment)
    page = tmp_path / "report.html"
    assert main(["report", "--experiment", str(exp), "--out", str(page)]) == 0
    dom = check_in_browser(page, tmp_path, f"report_{experiment}.png")
    table = re.search(r"<table id=\"paper-table\">.*?</table>", dom, re.S)
    assert table and re.search(r"<table id=\"trials-table\">", dom)
    for text in expected:
        assert text in table.group(0), text
    assert dom.count("<img ") >= 3  # metrics, training curves, the Figure-10 panel
    # Each arm against the space's control, above the raw trials, its verdict by the stated rule.
    compared = re.search(r"<table id=\"comparisons-table\">.*?</table>", dom, re.S)
    assert compared and dom.index("comparisons-table") < dom.index("trials-table")
    verdicts = re.findall(r"<b>(better|worse|no gain of 0.03|inconclusive: about \d+ more paired seeds?)</b>",
                          compared.group(0))
    arms = {"label_fraction": 2 * 4, "baselines": 3}[experiment]
    assert len(verdicts) == arms and "Verdicts: better where the 95 % interval" in dom


def test_comparisons_csv_recomputed_from_the_trials(label_fraction, tmp_path):
    import numpy as np
    import pandas as pd
    from scipy import stats

    # Untrained laid-out models all score 0: give each trial test scores of its own (as its
    # test.json would hold them after training), then let the sweep's collect() compare them.
    exp = tmp_path / "exp"
    shutil.copytree(label_fraction, exp)
    rng = np.random.default_rng(5)
    for run in (exp / "runs").iterdir():
        tested = json.loads((run / "test.json").read_text())
        lesions = np.asarray(tested["per_image"]["lesions"])
        per_image = np.where(lesions > 0, rng.uniform(0.1, 0.7, len(lesions)), 0.0)
        tested["dsc"] = float(per_image[lesions > 0].mean())
        tested["per_image"]["dsc"] = per_image.tolist()
        (run / "test.json").write_text(json.dumps(tested))
    tune.collect(exp)
    trials = pd.read_parquet(exp / "results.parquet")
    table = pd.read_csv(exp / "comparisons.csv")
    assert len(table) == 2 * 4  # two methods against "supervised only", at each of 4 label shares
    for _, row in table.iterrows():
        arm = trials[(trials["method"] == row["method"]) & (trials["label_fraction"] == row["label_fraction"])]
        control = trials[(trials["method"] == "supervised only") & (trials["label_fraction"] == row["label_fraction"])]
        paired = arm.merge(control, on="seed", suffixes=("_arm", "_control"))
        d = (paired["dsc_arm"] - paired["dsc_control"]).to_numpy()
        assert row["n"] == len(d) == 2 and row["seeds"] == "0, 1"
        assert row["mean_diff"] == pytest.approx(d.mean())
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / len(d) ** 0.5
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((d.mean() - half, d.mean() + half), nan_ok=True)
        # (scipy's p is NaN where every difference is the same: untrained laid-out models)
        assert row["p_value"] == pytest.approx(stats.ttest_rel(paired["dsc_arm"], paired["dsc_control"]).pvalue,
                                               nan_ok=True)
        assert row["boot95_low"] < row["mean_diff"] < row["boot95_high"]  # from each trial's per-image scores
        assert row["verdict"] in ("better", "worse", "no gain of 0.03") or row["verdict"].startswith("inconclusive")


@needs_chromium
def test_run_report_shows_its_curves_and_predictions(baselines, tmp_path):
    run = sorted((baselines / "runs").iterdir())[0]
    page = tmp_path / "run.html"
    assert main(["report", "--experiment", str(run), "--out", str(page)]) == 0
    dom = check_in_browser(page, tmp_path, "report_run.png")
    assert re.search(r"<table id=\"run-table\">", dom)
    assert "scored once" in dom and "the paper's 2 runs" in dom  # test.json, as the run's end wrote it
    assert "validation split" in dom and "id=\"budget\"" in dom


def test_report_shows_the_paper_beside_the_measured_numbers(baselines, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", "--experiment", str(baselines), "--out", str(page)]) == 0
    table = re.search(r"<table id='paper-table'>.*?</table>", page.read_text(), re.S).group(0)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)[2:]  # past the two header rows
    assert len(rows) == 4
    for model, published in (("U-Net", ("0.695", "0.722", "0.608")), ("Proposed", ("0.692", "0.721", "0.624"))):
        row = next(r for r in rows if f"<td>{model}</td>" in r)
        for value in published:  # each published score right after the measured one (± over the 2 seeds)
            assert re.search(rf"<td[^>]*>(<b>)?([01]\.\d{{3}} ± \d\.\d{{3}}|n/a)(</b>)?</td><td class='paper'>{value}</td>",
                             row), row
    (nnunet,) = [r for r in rows if "nnU-Net" in r]  # a trial of the sweep now, beside the paper's number
    assert "not run" not in nnunet and re.search(r"<td[^>]*>(<b>)?[01]\.\d{3} ± \d\.\d{3}(</b>)?</td><td class='paper'>0.757</td>", nnunet)


def test_report_marks_what_differs_from_the_papers_arm(data, tmp_path):
    # Fig. 9: the paper's D2 (views as samples) and D2_Agg rows state their samples; our fusions have none.
    exp = laid_out_experiment(tmp_path / "exp", data, "aggregation.yaml", seeds=1)
    page = tmp_path / "report.html"
    assert main(["report", "--experiment", str(exp), "--out", str(page)]) == 0
    table = re.search(r"<table id='paper-table'>.*?</table>", page.read_text(), re.S).group(0)
    assert "differs from the paper&#x27;s arm" in table
    rows = {re.search(r"<td>([^<]*)</td>", r).group(1): r for r in re.findall(r"<tr>(.*?)</tr>", table, re.S)[2:]}
    budgets = {run.trial.params["arm"]["name"]: run.budget for run in Experiment.open(exp).trial_runs()}
    views, summed = budgets["D2: views as samples"], budgets["D2_Agg: ANT + POST"]
    assert views["training_samples"] == 2 * summed["training_samples"] > 0
    for arm, paper_samples in (("D2: views as samples", "1,596"), ("D2_Agg: ANT + POST", "798")):
        cell = re.search(r"<td class='differs'>(.*?)</td>", rows[arm]).group(1)
        ours = budgets[arm]
        assert f"training samples: {ours['training_samples']:,} (paper {paper_samples})" in cell, cell
        assert f"data: {ours['all_scans']} scans" in cell and "112 clinical images" in cell
        assert "training: 6 optimizer steps" in cell and "(paper 400 epochs, steps not stated)" in cell
        # The measured samples sit beside the paper's, in the table's own columns too.
        assert f"<td>{ours['training_samples']}</td><td class='paper'>{paper_samples.replace(',', '')}</td>" in rows[arm]
    assert "no published number" in rows["two channels (ours)"]


def test_report_of_a_folder_that_is_neither_names_it(tmp_path, capsys):
    assert main(["report", "--experiment", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "neither an experiment folder" in err
    assert not (tmp_path / "r.html").exists()


def test_report_of_an_unfinished_sweep_says_how_to_finish_it(data, tmp_path, capsys):
    exp = Experiment.create(tmp_path / "exp", data, REPO / "tune_spaces" / "ablation.yaml")
    assert main(["report", "--experiment", str(exp.root), "--out", str(tmp_path / "r.html")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_the_report_reads_folders_through_their_owner_not_through_the_sweep():
    import ast

    source = (REPO / "platform" / "bonescan_platform" / "report.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "bonescan_platform.runs" in imported
    assert not imported & {"bonescan_platform.tune", "bonescan_platform.train"}
