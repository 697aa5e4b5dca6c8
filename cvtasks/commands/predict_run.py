"""Predict on a folder of images with a run's best checkpoint (or its export); the files go to the run's predictions/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import run_parser

def main(argv: list[str]) -> int:
    """``python -m cvtasks predict-run RUN INPUT [--backend B] [--runs_dir DIR] [predict flags]``: flags override the config."""
    from ..cli import CvtasksCLI
    from ..export import FORMATS, read_sidecar
    from ..runs import RunFolder

    ap = run_parser("predict-run", __doc__ or "")
    ap.add_argument("input", help="folder of images to predict on")
    ap.add_argument("--backend", default="pytorch",
                    help="pytorch (the best checkpoint) or the run's checked export: onnx (onnxruntime), torchscript, "
                         "exported_program (make export RUN=... FORMAT=... writes it)")
    ns, rest = ap.parse_known_args(argv)
    run = RunFolder.from_name(ns.run, ns.runs_dir)
    if not Path(ns.input).is_dir():
        raise FileNotFoundError(f"INPUT {ns.input!r} is not a folder; pass a folder of images "
                                f"(make predict RUN={run.name} INPUT=<folder>)")
    if ns.backend not in ("pytorch", *FORMATS):
        raise ValueError(f"unknown backend {ns.backend!r}; choose one of pytorch, {', '.join(FORMATS)}")
    common = ["--config", str(run.config_path), "--run_name", run.name, "--runs_dir", str(run.runs_dir),
              "--data.predict_dir", ns.input]
    if ns.backend == "pytorch":
        best = run.require(run.best_checkpoint,
                           f"it is written after the run's first validation; resume it with make resume RUN={run.name}")
        CvtasksCLI(["predict", *common, "--ckpt_path", str(best), *rest])
        return 0
    read_sidecar(run, ns.backend)  # a missing or unchecked export stops here, before anything is built
    # the export holds every weight: nothing is loaded into the task, nor fetched for its backbone
    _predict_with_export(run, ns.backend, ["predict", *common, "--model.pretrained", "null", *rest])
    return 0


def _predict_with_export(run: Any, fmt: str, args: Sequence[str]) -> None:
    """predict as the CLI runs it, with the run's ``fmt`` export standing in for the task's model."""
    from ..cli import CvtasksCLI
    from ..export import exported_model

    class ExportedPredictCLI(CvtasksCLI):
        def before_predict(self) -> None:
            """Put the export in the task's place just before predict runs it."""
            self.model.model = exported_model(run, self.model, fmt)

    ExportedPredictCLI(list(args))
