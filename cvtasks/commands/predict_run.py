"""Predict on a folder of images with a run's best checkpoint; the files go to the run's predictions/."""

from __future__ import annotations

from pathlib import Path

from . import run_parser


def main(argv: list[str]) -> int:
    """``python -m cvtasks predict-run RUN INPUT [--runs_dir DIR] [predict flags]``: flags override the run's config."""
    from ..cli import CvtasksCLI
    from ..runs import RunFolder

    ap = run_parser("predict-run", __doc__ or "")
    ap.add_argument("input", help="folder of images to predict on")
    ns, rest = ap.parse_known_args(argv)
    run = RunFolder.from_name(ns.run, ns.runs_dir)
    if not Path(ns.input).is_dir():
        raise FileNotFoundError(f"INPUT {ns.input!r} is not a folder; pass a folder of images (make predict RUN={run.name} INPUT=<folder>)")
    best = run.require(run.best_checkpoint, f"it is written after the run's first validation; resume it with make resume RUN={run.name}")
    CvtasksCLI(["predict", "--config", str(run.config_path), "--ckpt_path", str(best),
                "--run_name", run.name, "--runs_dir", str(run.runs_dir), "--data.predict_dir", ns.input, *rest])
    return 0
