"""The one line every benchmark prints first: what it ran on, and how busy that was."""

from __future__ import annotations

import os
import platform

import torch


def describe() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"machine: {cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f}")
