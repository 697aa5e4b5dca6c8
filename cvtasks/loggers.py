"""Weights & Biases without prompts: online when the user is logged in, offline otherwise."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

__all__ = ["AutoWandbLogger", "wandb_logged_in"]


def wandb_logged_in() -> bool:
    """True when W&B has an API key (environment or ~/.netrc); looks at no network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (netrc.NetrcParseError, OSError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return any(base in h for h in hosts)


class AutoWandbLogger(WandbLogger):
    """WandbLogger that picks online or offline by itself and never asks a question.

    ``mode``: "auto" (online when logged in), "online" or "offline". An explicit WANDB_MODE in the
    environment wins, as W&B's own tools expect.
    """

    def __init__(self, *, mode: str = "auto", project: str = "cvtasks", **kwargs: Any) -> None:
        if mode not in ("auto", "online", "offline"):
            raise ValueError(f"W&B mode must be auto, online or offline, got {mode!r}")
        env_mode = os.environ.get("WANDB_MODE")
        if env_mode in ("offline", "dryrun", "disabled"):
            offline = True
        elif mode == "auto":
            offline = not wandb_logged_in()
        else:
            offline = mode == "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if offline:
            os.environ["WANDB_MODE"] = "offline"
        kwargs.setdefault("resume", "allow")
        super().__init__(project=project, offline=offline, **kwargs)
        self.mode = "offline" if offline else "online"
