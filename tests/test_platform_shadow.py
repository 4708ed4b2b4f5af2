"""`import platform` must stay the standard library's (docs/design.md: the platform/ rule)."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_platform_from_repo_root_is_stdlib():
    # `python -c` puts the current directory first on sys.path, like `python -m` and pytest's rootdir.
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.__file__); print(platform.system())"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert Path(out[0]).parent == Path(sysconfig.get_paths()["stdlib"])
    assert out[1]  # platform.system() works


def test_platform_dir_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "platform.py").exists()


def test_bonescan_platform_imports_from_its_source_dir():
    import bonescan_platform

    assert Path(bonescan_platform.__file__).parent == REPO / "platform" / "bonescan_platform"


def test_bonescan_model_never_imports_ray():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "bonescan_model").rglob("*.py")
        if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())
    ]
    assert offenders == []
