"""Export a run's best model (ONNX, TorchScript, ExportedProgram) and check it against PyTorch on the val split."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, fields
from typing import Any

from . import run_parser

#: figures left out of the printed table (report.json keeps every one): per class and per object size
_DETAIL = ("/iou_", "/ap_", "/segm_ap_", "mar_", "_small", "_medium", "_large")


def main(argv: list[str]) -> int:
    """``python -m cvtasks export RUN [--format F] [--limit N] [--check_only] [tolerances]``; 1 when the check fails."""
    from ..export import FORMATS, ExportError, Tolerances

    ap = run_parser("export", __doc__ or "")
    ap.add_argument("--format", default="onnx", help=f"{' | '.join(FORMATS)} (default: onnx)")
    ap.add_argument("--limit", type=int, default=None, help="check on the first N validation samples only (default: all)")
    ap.add_argument("--check_only", action="store_true", help="check the run's existing export again, without exporting")
    ap.add_argument("--exporter", default=None,
                    help="try only this exporter: onnx-dynamo, onnx-torchscript (onnx), jit-trace (torchscript), "
                         "torch-export (exported_program); default: each of the format's in turn")
    for f in fields(Tolerances):
        ap.add_argument(f"--{f.name}", type=float, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    ns = ap.parse_args(argv)
    if ns.format not in FORMATS:
        raise ValueError(f"unknown export format {ns.format!r}; choose one of {', '.join(FORMATS)} (make export FORMAT=...)")
    if ns.limit is not None and ns.limit < 1:
        raise ValueError(f"--limit must be at least 1 validation sample, got {ns.limit}")
    tol = Tolerances(**{f.name: getattr(ns, f.name) for f in fields(Tolerances)})
    try:
        return export_and_check(ns.run, ns.runs_dir, ns.format, tol, ns.limit, ns.check_only, ns.exporter)
    except ExportError as exc:  # every exporter tried and why each failed: a result to report, not a crash
        print(f"cvtasks: error: {exc}", file=sys.stderr)
        return 1


def export_and_check(run_name: str, runs_dir: str, fmt: str, tol: Any, limit: int | None, check_only: bool,
                     only: str | None = None) -> int:
    """Export (unless ``check_only``), check parity on the val split, compare the metrics; writes model.json, report.json."""
    from .. import export as ex
    from ..runs import RunFolder

    run = RunFolder.from_name(run_name, runs_dir)
    task = run.load_task()
    recipe = ex.task_export(task)
    ex.exporters(recipe, fmt, only)  # an exporter that does not write this format stops here, before any work
    datamodule = ex.build_datamodule(run, task)
    loader, indices = ex.validation_loader(datamodule, limit)
    if check_only:
        entry, export_seconds = ex.read_sidecar(run, fmt, checked=False)[1], None
    else:
        entry, export_seconds = _export(run, task, recipe, recipe.inputs(next(iter(loader))), fmt, tol, only)
    path = run.export_dir / entry["file"]
    fixed = entry.get("fixed_size")
    exported = ex.ExportedModel(recipe, ex.load_exported(path, entry["format"]), str(path), tuple(fixed) if fixed else None)
    _print_export(run.name, fmt, path, entry, export_seconds)

    start = time.perf_counter()
    parity = ex.check_parity(task, exported, loader, tol, indices)
    entry = {**entry, "parity_passed": parity.ok}
    common = {"run": run.name, "task": f"{type(task).__module__}.{type(task).__name__}", "kind": recipe.kind,
              "class_names": list(task.class_names), **recipe.describe(task, datamodule)}
    ex.update_json(run.export_dir / ex.SIDECAR, common, fmt, entry)
    outcome: dict[str, Any] = {
        **{k: entry.get(k) for k in _REPORTED}, "export_seconds": export_seconds,
        "parity": {"passed": parity.ok, "samples": parity.samples, "tolerances": asdict(tol),
                   "worst_sample": parity.worst_sample, "worst": parity.worst.detail if parity.worst else None,
                   "figures": parity.stats},
    }
    report = run.export_dir / ex.REPORT
    if not parity.ok:
        outcome["check_seconds"] = round(time.perf_counter() - start, 2)
        ex.update_json(report, {"run": run.name}, fmt, outcome)
        hint = f"\n  note: {recipe.failure_hint}" if recipe.failure_hint else ""
        print(f"cvtasks: error: the {fmt} export of run {run.name!r} differs from PyTorch: worst is {parity.worst_sample}: "
              f"{parity.worst.detail if parity.worst else ''}; report in {report}{hint}", file=sys.stderr)
        return 1
    pytorch = ex.validation_metrics(task, loader)
    with ex.standing_in(task, exported):
        exported_figures = ex.validation_metrics(task, loader)
    outcome["metrics"] = {"pytorch": pytorch, "exported": exported_figures}
    outcome["check_seconds"] = round(time.perf_counter() - start, 2)
    ex.update_json(report, {"run": run.name}, fmt, outcome)
    worst = f" (worst: {parity.worst_sample}: {parity.worst.detail})" if parity.worst else ""
    print(f"parity on {parity.samples} validation samples: passed{worst}")
    print(_metrics_table(pytorch, exported_figures))
    print(f"model.json and report.json in {run.export_dir}")
    return 0


#: what report.json repeats from model.json's entry
_REPORTED = ("file", "format", "exporter", "exporter_order", "fallbacks", "fixed_size", "fixed_size_reason", "python_steps")


def _export(run: Any, task: Any, recipe: Any, example: Any, fmt: str, tol: Any, only: str | None) -> tuple[dict[str, Any], float]:
    """Write the file; model.json's entry for it (parity not yet known) and the seconds it took."""
    from .. import export as ex

    result = ex.export_model(task, example, fmt, run.export_dir, tol, only)
    entry = {"file": result.path.name, "format": result.format, "exporter": result.exporter,
             "exporter_order": None if only else recipe.exporter_notes.get(fmt), "fallbacks": result.fallbacks,
             "fixed_size": result.fixed_size, "fixed_size_reason": result.fixed_reason,
             "python_steps": recipe.python_steps(task), "checkpoint": str(run.best_checkpoint.relative_to(run.root)),
             "checkpoint_sha256": ex.file_sha256(run.best_checkpoint), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if result.format != fmt:
        entry["note"] = f"{fmt} could not be written (see fallbacks); the model is a {result.format} file instead"
    return entry, round(result.seconds, 2)


def _print_export(run: str, fmt: str, path: Any, entry: dict[str, Any], seconds: float | None) -> None:
    size = path.stat().st_size / 2**20
    took = f" in {seconds:.1f} s" if seconds is not None else " (checked again, not re-exported)"
    print(f"export of run {run!r} as {fmt}: {path} ({size:.1f} MiB){took}")
    print(f"  exporter: {entry['exporter']}")
    if entry.get("exporter_order"):
        print(f"  order: {entry['exporter_order']}")
    for fb in entry.get("fallbacks") or []:
        print(f"  not used: {fb['exporter']}: {fb['reason']}")
    if entry.get("note"):
        print(f"  note: {entry['note']}")
    if entry.get("fixed_size"):
        h, w = entry["fixed_size"]
        print(f"  takes only {h}x{w} images, as no exporter kept the model's other sizes: {entry.get('fixed_size_reason')}")
    print(f"  steps kept in Python: {', '.join(entry.get('python_steps') or []) or 'none'}")


def _metrics_table(pytorch: dict[str, float], exported: dict[str, float]) -> str:
    """The shared figures, side by side: PyTorch, exported, their difference."""
    keys = [k for k in sorted(pytorch) if k in exported and not any(part in k for part in _DETAIL)]
    width = max([len(k) for k in keys] + [6])
    line = "-" * (width + 36)
    rows = [line, f"{'metric':<{width}}  {'pytorch':>10}  {'exported':>10}  {'diff':>10}", line]
    rows += [f"{k:<{width}}  {pytorch[k]:>10.4f}  {exported[k]:>10.4f}  {exported[k] - pytorch[k]:>+10.2e}" for k in keys]
    rows.append(line)
    return "\n".join(rows)
