"""`bonescan nnunet`: the real nnU-Net v2 trained on a label budget inside a Ray task, its test
predictions scored with bonescan's metrics; refusals before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bonescan_platform.cli import main

nnunetv2 = pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed (pip install -e '.[nnunet]')")


def test_without_the_extra_it_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "from bonescan_platform.cli import main\n"
            f"raise SystemExit(main(['nnunet', '--data', {str(tmp_path / 'none')!r}, '--out', {str(tmp_path / 'run')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: nnunetv2: the nnU-Net extra is not installed: "
                                                "pip install -e '.[nnunet]'"]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def data(cohort):
    return cohort(8, 11)


@pytest.mark.ray
def test_an_empty_label_budget_or_a_used_folder_is_refused_and_nothing_is_written(data, tmp_path, capsys):
    assert main(["nnunet", "--data", str(data), "--out", str(tmp_path / "run"), "--labeled-scans", "0"]) == 2
    assert "selects no labeled scan" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(["nnunet", "--data", str(data), "--out", str(used)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"] and (used / "notes.txt").read_text() == "mine"


@pytest.mark.ray
def test_nnunet_trains_on_the_budget_and_scores_the_test_split_once(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["nnunet", "--data", str(data), "--out", str(run), "--label-fraction", "1.0",
                 "--epochs", "1", "--iterations", "2"]) == 0
    assert "test split DSC" in capsys.readouterr().out
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1] and history[-1]["steps"] == 2
    assert 0.0 <= history[-1]["val_dsc"] <= 1.0 and "val_nnunet_pseudo_dice" in history[-1]
    tested = json.loads((run / "test.json").read_text())
    assert tested["split"] == "test" and tested["model"] == "nnU-Net v2" and tested["epochs"] == 1
    budget = json.loads((run / "budget.json").read_text())
    record = json.loads((run / "nnunet.json").read_text())
    assert tested["labeled_scans"] == budget["labeled_scans"] == record["labeled_scans"] > 0
    assert tested["images"] == record["test_cases"] - tested.get("lesion_free_images", 0) or tested["images"] > 0
    for key in ("dsc", "cpa", "recall", "lesion_sensitivity"):
        assert 0.0 <= tested[key] <= 1.0
    # nnU-Net's own products stay in the run: its raw dataset, its plans, its training log.
    raw = run / "nnUNet_raw" / "Dataset501_BoneScan"
    assert json.loads((raw / "dataset.json").read_text())["channel_names"] == {"0": "ANT", "1": "POST (mirrored)"}
    # z-scored per image, as nnU-Net does channels not named CT (what its smaller intensity sample relies on)
    plans = json.loads((run / "nnUNet_preprocessed" / "Dataset501_BoneScan" / "nnUNetPlans.json").read_text())
    assert set(plans["configurations"]["2d"]["normalization_schemes"]) == {"ZScoreNormalization"}
    logs = list((run / "nnUNet_results").rglob("training_log_*.txt"))
    assert logs and "epoch 0" in logs[0].read_text().lower() or logs
    # nnU-Net's fold 0 is bonescan's split: the validation patients, never the test ones.
    (fold,) = json.loads((run / "nnUNet_preprocessed" / "Dataset501_BoneScan" / "splits_final.json").read_text())
    assert len(fold["val"]) == record["val_cases"] > 0 and len(fold["train"]) == record["train_cases"]
    listed = json.loads((raw / "dataset.json").read_text())["dataset"]  # every training case's files, listed
    assert set(listed) == set(fold["train"] + fold["val"])
    assert all((raw / f).is_file() for case in listed.values() for f in [*case["images"], case["label"]])
    test_cases = {p.name.rsplit("_", 1)[0] for p in (raw / "imagesTs").glob("*.png")}
    assert test_cases and not test_cases & set(fold["train"] + fold["val"])
    assert not list(tmp_path.glob(".run.partial-*"))  # the stage was moved into place


@pytest.mark.ray
def test_a_sweep_runs_nnunet_as_a_trial_and_the_report_fills_its_row(data, tmp_path):
    import re

    import pyarrow.parquet as pq
    import yaml

    from tiny import tiny_config

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(epochs=1)))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": "tiny.yaml", "fixed": {"model.aggregation": "input"},
        "parameters": {"case": {"grid": [{"name": "nnU-Net", "trainer": "nnunet", "nnunet_iterations": 2,
                                          "label_fraction": 1.0}]}},
        "report": {"x": "case", "columns": ["labeled_scans", "case", "dsc"],
                   "paper": [{"case": "nnU-Net", "labeled_scans": 798, "dsc": 0.757}]}}))
    exp = tmp_path / "exp"
    assert main(["tune", "--data", str(data), "--space", str(space), "--out", str(exp)]) == 0
    (row,) = pq.read_table(exp / "results.parquet").to_pylist()
    assert row["status"] == "finished" and row["epochs"] == 1 and row["steps"] == 2 and 0.0 <= row["dsc"] <= 1.0
    assert row["parameters"] > 1e6  # nnU-Net's own network, planned by nnU-Net
    page = tmp_path / "report.html"
    assert main(["report", "--experiment", str(exp), "--out", str(page)]) == 0
    table = re.search(r"<table id='paper-table'>.*?</table>", page.read_text(), re.S).group(0)
    (nnunet,) = [r for r in re.findall(r"<tr>(.*?)</tr>", table, re.S) if "<td>nnU-Net</td>" in r]
    assert f"<td>{row['labeled_scans']}</td><td class='paper'>798</td>" in nnunet
    assert "<td class='paper'>0.757</td>" in nnunet and "training: 2 optimizer steps, 1 epochs" in nnunet
