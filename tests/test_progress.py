"""Progress bars on a terminal, none where output is not one: real `bonescan` runs, on a
pseudo-terminal and on pipes."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from bonescan_platform.cli import main

REPO = Path(__file__).resolve().parents[1]
BAR = "%|"  # what every tqdm meter holds: "synth:  50%|█████     | 1/2 [...]"


def _command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from bonescan_platform.cli import main; sys.exit(main(sys.argv[1:]))",
            *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}:{REPO}"}


def _on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run on a pseudo-terminal 120 columns wide (tqdm draws nothing on a 0-column one)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=_env())
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return process.wait(timeout=120), output.decode(errors="replace")


def test_a_terminal_gets_a_bar(tmp_path):
    code, output = _on_a_terminal(_command("synth", "--patients", "2", "--out", str(tmp_path / "c")))
    assert code == 0, output
    assert f"synth: 100{BAR}" in output and "2/2" in output, output


def test_a_pipe_gets_no_bar(tmp_path):
    done = subprocess.run(_command("synth", "--patients", "2", "--out", str(tmp_path / "c")),
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 synthetic patients" in done.stdout
    for stream in (done.stdout, done.stderr):
        assert "\r" not in stream and BAR not in stream, stream


@pytest.mark.ray
def test_ingest_and_evaluate_write_no_bar_into_a_log(ray_local, deid_secret, tmp_path, capfd):
    """Ingest (Ray tasks) and evaluate's runs, their output captured as a log captures it."""
    from bonescan_model.checkpoint import save_checkpoint
    from bonescan_model.network import ModelConfig, build_model

    assert main(["synth", "--patients", "3", "--out", str(tmp_path / "c")]) == 0
    assert main(["ingest", "--dicom", str(tmp_path / "c" / "dicom"), "--labels", str(tmp_path / "c" / "labels"),
                 "--out", str(tmp_path / "shards")]) == 0
    config = ModelConfig(width=4, dilations=(1, 2), recurrence=1)
    save_checkpoint(tmp_path / "run" / "model.pt", build_model(config), config)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "shards"),
                 "--runs", "2"]) == 0
    out, err = capfd.readouterr()
    assert "ingested 3 scan(s)" in out and "2-run protocol" in out
    for stream in (out, err):
        assert "\r" not in stream and BAR not in stream, stream
    assert "Progress bars disabled" not in err  # Ray Data's notice about its own bars, switched off for ours
