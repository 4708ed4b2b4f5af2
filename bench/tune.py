"""Sweeps: trials side by side against one after another, and ASHA against the full grid.

Prints two comparisons, each against a baseline measured in the same run on the same Ray:
1. wall time of 4 small trials run concurrently (max_concurrent_trials 4) vs one after
   another (baseline: max_concurrent_trials 1); goal: concurrent faster.
2. compute (epochs trained, training seconds) of a grid swept with ASHA vs the same grid run
   in full (baseline), and whether ASHA's best validation DSC is within 0.01 of the grid's.

Ray is started here with 4 logical CPUs on this machine: 4 trials take 4 x (0.25 + 0.5) CPU
and Ray Data keeps its one (docs/ray.md, "2-CPU deadlock"); both runs of each comparison use it.

    python bench/tune.py [--patients 40] [--epochs 12] [--data SHARDS] [--parts 1,2]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

SMALL = {"model": {"width": 4, "recurrence": 1, "dilations": [1, 2]}, "batch_size": 4, "lr": 0.003,
         "supervised": "dice_ce", "epochs": 2}
LEARNING = {"model": {"width": 8, "recurrence": 1, "dilations": [1, 2]}, "batch_size": 4,
            "supervised": "dice_ce"}
LOGICAL_CPUS = 4
GRACE = 4  # ASHA's first rung, in epochs; rungs at 4 and 8 of 12


def start_ray(cpus: int):
    """A Ray of our own whose address every Ray process knows (RAY_ADDRESS): Ray Train's
    placement-group cleaner asks the State API, which cannot pick between several Ray
    instances on one machine without it, and ASHA's stopped trials would keep their CPUs."""
    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("", 0))
            ports.append(s.getsockname()[1])
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{ports[0]}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "gcs_server_port": ports[0], "include_dashboard": True, "dashboard_port": ports[1],
        "object_store_memory": 512 * 1024**2})
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def sweep(root: Path, name: str, data: Path, base: dict, **space) -> tuple[list[dict], float]:
    from bonescan_platform.tune import sweep as run_sweep

    folder = root / name
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / "space.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "evaluate_runs": 1, **space}))
    start = time.perf_counter()
    assert run_sweep(str(data), str(folder / "space.yaml"), str(folder / "exp")) == 0
    wall = time.perf_counter() - start
    return pq.read_table(folder / "exp" / "results.parquet").to_pylist(), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 40 patients and 12 epochs: the smallest setting seen to find lesions at all (the demo's
    # first lesion came at epoch 7); below it every trial scores the same and ASHA has nothing to rank.
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each trial of the ASHA comparison")
    parser.add_argument("--data", help="shards to sweep on (default: a synthetic cohort of --patients)")
    parser.add_argument("--parts", default="1,2", help="which comparisons to run")
    args = parser.parse_args()
    print(describe())

    from bonescan_model.synth import write_cohort
    from bonescan_platform.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["BONESCAN_SECRET_FILE"] = str(root / "secret")
        cluster = start_ray(LOGICAL_CPUS)
        parts = {int(p) for p in args.parts.split(",")}
        try:
            if args.data:
                data = Path(args.data).resolve()
            else:
                write_cohort(root / "cohort", args.patients, seed=0)
                assert ingest(str(root / "cohort" / "dicom"), str(root / "shards"),
                              str(root / "cohort" / "labels")) == 0
                data = root / "shards"

            if 1 in parts:
                grid4 = {"parameters": {"label_fraction": {"grid": [0.1, 0.2, 0.3, 0.4]}}}
                _, alone = sweep(root, "one_after_another", data, SMALL, **grid4, max_concurrent_trials=1)
                _, together = sweep(root, "side_by_side", data, SMALL, **grid4, max_concurrent_trials=4)
            if 2 not in parts:
                return report(args, alone, together, None)

            grid = {"parameters": {"lr": {"grid": [0.001, 0.003, 0.01, 0.03]},
                                   "label_fraction": {"grid": [0.37, 0.7]}},
                    "max_concurrent_trials": 4}
            base = {**LEARNING, "epochs": args.epochs}
            full = sweep(root, "full_grid", data, base, **grid)
            asha = sweep(root, "asha", data, base, **grid,
                         scheduler={"type": "asha", "grace_period": GRACE, "reduction_factor": 2})
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()
    report(args, alone if 1 in parts else None, together if 1 in parts else None, (full, asha))


def report(args, alone: float | None, together: float | None, grids: tuple | None) -> None:
    if alone is not None:
        _report_concurrency(args, alone, together)
    if grids is not None:
        _report_asha(args, *grids)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _report_concurrency(args, alone: float, together: float) -> None:
    print(f"\n1. 4 trials ({SMALL['epochs']} epochs, width {SMALL['model']['width']}, {args.patients} patients):")
    print("| run | wall (s) | vs one after another |")
    print("|---|---|---|")
    print(f"| one after another (baseline) | {alone:.1f} | 1.00 |")
    print(f"| side by side (4 at once) | {together:.1f} | {alone / together:.2f}x faster |")


def _report_asha(args, full_run: tuple[list[dict], float], asha_run: tuple[list[dict], float]) -> None:
    (full, full_wall), (asha, asha_wall) = full_run, asha_run

    def summary(rows: list[dict]) -> dict:
        best = max(rows, key=lambda r: r["best_val_dsc"])
        return {"trials": len(rows), "stopped": sum(r["status"] == "stopped" for r in rows),
                "epochs": sum(r["epochs"] for r in rows), "train_s": sum(r["train_seconds"] for r in rows),
                "best": best["best_val_dsc"], "best_label": best["label"], "test_dsc": best["dsc"]}

    f, a = summary(full), summary(asha)
    print(f"\n2. grid of {f['trials']} configurations x {args.epochs} epochs (width {LEARNING['model']['width']}), "
          "4 trials at once:")
    print("| run | trials stopped early | epochs trained | training s | wall s | best val DSC (trial) | "
          "its test DSC |")
    print("|---|---|---|---|---|---|---|")
    for name, s, wall in (("full grid (baseline)", f, full_wall), (f"ASHA (grace {GRACE}, factor 2)", a, asha_wall)):
        print(f"| {name} | {s['stopped']} | {s['epochs']} | {s['train_s']:.0f} | {wall:.0f} | "
              f"{s['best']:.3f} ({s['best_label']}) | {s['test_dsc']:.3f} |")
    print(f"\nASHA / full grid: epochs {a['epochs'] / f['epochs']:.2f}, training seconds "
          f"{a['train_s'] / f['train_s']:.2f}, wall {asha_wall / full_wall:.2f}; best validation DSC "
          f"{a['best']:.3f} vs {f['best']:.3f}: {'within' if abs(a['best'] - f['best']) <= 0.01 else 'NOT within'} 0.01")


if __name__ == "__main__":
    main()
