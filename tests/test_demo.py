"""`bonescan demo` end to end through the CLI, on a small cohort and a tiny config."""

from __future__ import annotations

import json

import yaml

from bonescan_platform.cli import main
from tiny import tiny_config

TINY = tiny_config(lr=0.003, supervised="dice_ce", epochs=2)


def test_demo_runs_every_step_and_says_where_each_output_is(ray_local, tmp_path, monkeypatch, capsys):
    # A fixed site secret: the patient-level split, and so which scans are tested, repeats.
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(32)))
    monkeypatch.setenv("BONESCAN_SECRET_FILE", str(secret))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "demo"

    assert main(["demo", "--out", str(out), "--patients", "10", "--config", str(config)]) == 0

    printed = capsys.readouterr().out
    assert all(f"[{n}/6]" in printed for n in range(1, 7))
    assert "count threshold" in printed and "trained model" in printed
    for path in (out / "cohort", out / "shards", out / "run", out / "demo_metrics.json",
                 out / "predictions", out / "report.html"):
        assert path.exists() and str(path) in printed

    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert metrics["split"] == "test"
    for result in (metrics["model"], metrics["count_threshold_baseline"]):
        assert result["split"] == "test" and result["images"] > 0 and len(result["runs"]) == 10
        assert all(0 <= result[k] <= 1 for k in ("dsc", "cpa", "recall")) or result["lesion_images"] == 0
    baseline = metrics["count_threshold_baseline"]
    assert baseline["tau"] > 0 and baseline["tuned_on"] == "val"  # chosen on validation, like the model
    assert metrics["model"] == json.loads((out / "run" / "test.json").read_text())  # the run's one test score
    assert len((out / "run" / "history.csv").read_text().splitlines()) == 1 + TINY["epochs"]

    predicted = sorted(p.name for p in (out / "predictions").rglob("*") if p.is_file())
    assert any(n.endswith(".mask.png") for n in predicted)
    assert any(n.endswith(".overlay.png") for n in predicted)
    assert any(n.endswith(".json") for n in predicted)

    page = (out / "report.html").read_text()
    assert "Training run" in page and "scored once" in page and "the paper's 10 runs" in page


def test_demo_refuses_a_cohort_too_small_to_split(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--patients", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--patients must be at least" in err[0]
