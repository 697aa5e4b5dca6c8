"""Shared fixtures: a tiny registered backbone, and helpers to run the CLI in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from collections.abc import Iterator

import pytest
import torch

from cvtasks import StagedBackbone, register_backbone
from cvtasks.layers import ConvNormAct

REPO = Path(__file__).resolve().parents[1]

# two intra-op threads at most; under pytest-xdist the workers share the cores between them
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m cvtasks ...` in ``cwd`` with the repo's configs reachable as configs/."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    # a W&B run made in this process left its service's address here; a user's command starts its own
    full_env.pop("WANDB_SERVICE", None)
    return subprocess.run(
        [sys.executable, "-m", "cvtasks", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def check_outcomes(measured: dict[str, float], limits: dict[str, tuple[str, float]]) -> None:
    """Assert each measured training outcome against its limit ("<" or ">" a threshold).

    Limits sit many times further from the measured values than seeds, thread counts or CPUs move
    them; `python tests/spread.py` measures that spread, so a new limit can be checked against it.
    """
    for name, (op, limit) in limits.items():
        value = measured[name]
        ok = value < limit if op == "<" else value > limit
        assert ok, f"{name} = {value:.4f}, expected {op} {limit} (all measured: {measured})"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A temporary working folder holding a link to the repo's configs."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path


@register_backbone("_tinynet", family="test", min_input_size=32)
class TinyNet(StagedBackbone):
    """Five stride-2 conv stages (strides 2..32), a few channels each: a stand-in for a real backbone."""

    def __init__(self, in_chans: int = 3, out_features: list[str] | None = None, width: int = 8) -> None:
        super().__init__()
        chans = [width, width, 2 * width, 2 * width, 4 * width]
        levels, prev = [], in_chans
        for i, c in enumerate(chans):
            self.stages[f"s{i}"] = ConvNormAct(prev, c, 3, stride=2)
            levels.append((f"s{i}", f"c{i + 1}", c, 2 ** (i + 1)))
            prev = c
        self._finish(levels, out_features)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny ops on two contended cores get much slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
