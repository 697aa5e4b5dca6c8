"""The install is reproducible: make builds .venv within constraints.txt, the versions the suite passed with."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from conftest import REPO


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_dependency_and_match_this_environment() -> None:
    pins = {_norm(k): v for k, v in _pins().items()}
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values())  # exact versions only
    # every direct dependency of cvtasks (and its test and export extras) is pinned
    requires = metadata.requires("cvtasks") or []
    direct = {_norm(re.split(r"[\s\[<>=!;~]", r, maxsplit=1)[0]) for r in requires}
    assert direct - set(pins) == set(), f"not in constraints.txt: {sorted(direct - set(pins))}; run make lock"
    # and the Makefile's environment is the one the file describes (an environment of your own may differ)
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        return
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not differ, f"constraints.txt and this environment differ (pinned, installed): {differ}; run make lock"
