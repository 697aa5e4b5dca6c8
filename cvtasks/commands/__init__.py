"""Commands beyond Lightning's fit/validate/test/predict: one module per command, dispatched by the table below.

Each module has a one-line docstring (what ``python -m cvtasks`` lists) and ``main(argv) -> int``
(the exit status). A new command is a new module here and one line in ``COMMANDS``; commands that
work on a run take it by name through ``run_parser`` and read it through ``cvtasks.runs.RunFolder``.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["COMMANDS", "command_help", "run_command", "run_parser"]

#: command name -> module under cvtasks.commands (imported only when the command runs)
COMMANDS: dict[str, str] = {
    "backbones": "backbones",
    "check-backbone": "check_backbone",
    "compare": "compare",
    "cv": "cv",
    "evaluate": "evaluate",
    "export": "export",
    "predict-run": "predict_run",
    "resume": "resume",
    "search": "search",
    "summary": "summary",
    "weights": "weights",
}


def run_command(name: str, argv: list[str]) -> int:
    """Run the command ``name`` with its arguments; returns its exit status."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} "
                         "or a Lightning subcommand (fit, validate, test, predict)")
    module = importlib.import_module(f"{__name__}.{COMMANDS[name]}")
    return int(module.main(argv))


def command_help() -> str:
    """One line per command: its name and its module's docstring."""
    lines = []
    for name, module in COMMANDS.items():
        doc = (importlib.import_module(f"{__name__}.{module}").__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<16} {doc[0] if doc else ''}")
    return "\n".join(lines)


def run_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser for a command on one run: the run's name (or folder) and ``--runs_dir``."""
    # no abbreviations: the flags after the run go to the LightningCLI and must not match ours by prefix
    ap = argparse.ArgumentParser(prog=f"python -m cvtasks {name}", description=description, allow_abbrev=False)
    ap.add_argument("run", help="run name (under --runs_dir) or path of a run folder")
    ap.add_argument("--runs_dir", default="runs", help="where run folders live (default: runs)")
    return ap
