"""The platform's layers (docs/design.md, "Layers"), checked on the source: who may import whom,
and who alone touches a run folder's files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform" / "bonescan_platform"
MODEL = REPO / "bonescan_model"

# Bottom to top. A module imports modules of its own layer or below; a job no other job.
FOUNDATIONS = {"storage", "cluster", "tracking", "telemetry", "loopback_torch", "shards", "label_match", "splits",
               "stream", "search_space"}
RUNS_AND_TASKS = {"runs", "harness", "scoring", "comparisons", "segmentation", "dcgan", "nnunet_baseline", "nnunet_task"}
JOBS = {"ingest", "train", "tune", "evaluate", "predict", "report", "augment", "nnunet", "serve"}
TOP = {"demo", "cli"}  # the demo composes the jobs; the CLI dispatches to them
LAYERS = [FOUNDATIONS, RUNS_AND_TASKS, JOBS, TOP]
# The files of a run and an experiment folder: their names are runs.py's alone.
RUN_FILES = ("run.json", "config.yaml", "test.json", "history.csv", "history.json", "budget.json", "splits.json",
             "trial.json", "experiment.json", "gan.yaml")


def _modules(package: Path) -> dict[str, Path]:
    return {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """The bonescan_platform modules ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bonescan_platform.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "bonescan_platform":
                found |= {a.name for a in node.names}
            elif node.module.startswith("bonescan_platform."):
                found.add(node.module.split(".")[1])
    return found - {path.stem}


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_platform_module_has_a_layer():
    assert set(_modules(PLATFORM)) == set().union(*LAYERS)


@pytest.mark.parametrize("module", sorted(set().union(*LAYERS)))
def test_a_module_imports_only_its_layer_and_below_and_a_job_no_other_job(module):
    imported = _imports(_modules(PLATFORM)[module])
    above = sorted(m for m in imported if _layer(m) > _layer(module))
    assert above == [], f"{module} imports {above} from a layer above its own"
    if module in JOBS:
        jobs = sorted(imported & JOBS)
        assert jobs == [], f"the job {module} imports the job(s) {jobs}: share what they need from a lower layer"


def test_the_platform_has_no_import_cycle():
    graph = {m: _imports(p) for m, p in _modules(PLATFORM).items()}

    def visit(module: str, path: tuple[str, ...]) -> None:
        for nxt in sorted(graph[module]):
            assert nxt not in path, f"import cycle: {' -> '.join((*path, nxt))}"
            visit(nxt, (*path, nxt))

    for module in graph:
        visit(module, (module,))


def test_no_module_name_is_in_both_packages():
    assert sorted(set(_modules(PLATFORM)) & set(_modules(MODEL))) == []


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant of ``path`` but its docstrings (module, class, function)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_only_runs_py_names_the_files_of_a_run_folder():
    files = [*PLATFORM.glob("*.py"), *(REPO / "bench").glob("*.py"), *MODEL.rglob("*.py")]
    offenders = [f"{path.relative_to(REPO)}:{line}: {text!r}" for path in files if path.name != "runs.py"
                 for line, text in _string_literals(path) if any(name in text for name in RUN_FILES)]
    assert offenders == []


def test_the_checks_see_what_they_check(tmp_path):
    # The checks above would pass on nothing: show they catch an offender.
    bad = tmp_path / "train.py"
    bad.write_text('"""Docstrings may say run.json."""\nfrom bonescan_platform import tune\n'
                   'def f():\n    from bonescan_platform.evaluate import x\n    return "run.json"\n')
    assert _imports(bad) == {"tune", "evaluate"}
    assert [text for _, text in _string_literals(bad)] == ["run.json"]
