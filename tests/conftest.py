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


#: LeNet-5 at its native 32 px on 30 scenes, one epoch: a fit trains and is evaluated in about the time Python takes to start
TINY_CLASSIFICATION_FIT = [
    "--config", "configs/classification.yaml",
    "--config", "configs/logger/csv.yaml",
    "--model.backbone", "lenet5",
    "--data.num_samples", "30",
    "--data.img_size", "32",
    "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def two_object_image() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 64-pixel noise image with a red box of class 0 and a blue box of class 2, and its target."""
    image = torch.rand(3, 64, 64)
    image[:, 8:30, 6:34] = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    image[:, 36:60, 40:62] = torch.tensor([0.2, 0.2, 1.0])[:, None, None]
    return image, {"boxes": torch.tensor([[6.0, 8.0, 34.0, 30.0], [40.0, 36.0, 62.0, 60.0]]), "labels": torch.tensor([0, 2])}


def overfit_detector(det: torch.nn.Module, image: torch.Tensor, target: dict[str, torch.Tensor],
                     steps: int, lr: float = 3e-3) -> tuple[float, dict[str, torch.Tensor]]:
    """``steps`` Adam steps of ``det`` on one image: (mean of the last five losses over the first five, its detections)."""
    opt = torch.optim.Adam(det.parameters(), lr=lr)
    det.train()
    history = []
    for _ in range(steps):
        loss = sum(det([image], [target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    det.eval()
    with torch.no_grad():
        out = det([image])[0]
    return (sum(history[-5:]) / 5) / (sum(history[:5]) / 5), out


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
