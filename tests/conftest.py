"""Shared fixtures: a tiny registered backbone, and helpers to run the CLI in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m cvtasks ...` in ``cwd`` with the repo's configs reachable as configs/."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cvtasks", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A temporary working folder holding a link to the repo's configs."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path
