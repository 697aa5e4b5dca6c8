"""Evaluate a run's best checkpoint on its test split; the figures go to the run's test_metrics.json."""

from __future__ import annotations

from . import run_parser


def main(argv: list[str]) -> int:
    """``python -m cvtasks evaluate RUN [--runs_dir DIR] [test flags]``: flags override the run's config."""
    from ..cli import CvtasksCLI
    from ..runs import RunFolder

    ns, rest = run_parser("evaluate", __doc__ or "").parse_known_args(argv)
    run = RunFolder.from_name(ns.run, ns.runs_dir)
    best = run.require(run.best_checkpoint, f"it is written after the run's first validation; resume it with make resume RUN={run.name}")
    CvtasksCLI(["test", "--config", str(run.config_path), "--ckpt_path", str(best),
                "--run_name", run.name, "--runs_dir", str(run.runs_dir), *rest])
    return 0
