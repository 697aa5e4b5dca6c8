"""Continue an interrupted run from its folder alone (its config.yaml and checkpoints/last.ckpt)."""

from __future__ import annotations

from . import run_parser


def main(argv: list[str]) -> int:
    """``python -m cvtasks resume RUN [--runs_dir DIR] [fit flags]``: fit again from last.ckpt, same run and logger id."""
    from ..cli import CvtasksCLI
    from ..runs import RunFolder

    ns, rest = run_parser("resume", __doc__ or "").parse_known_args(argv)
    try:
        run = RunFolder.from_name(ns.run, ns.runs_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no run to resume: {exc}") from None
    run.require(run.last_checkpoint, f"start it again with make train RUN={run.name}")
    CvtasksCLI(["fit", "--config", str(run.config_path), "--run_name", run.name, "--runs_dir", str(run.runs_dir),
                "--ckpt_path", str(run.last_checkpoint), *rest])
    return 0
