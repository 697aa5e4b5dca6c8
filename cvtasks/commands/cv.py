"""k-fold cross-validation: one run per fold, then each fold's final metrics and their mean ± standard deviation."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from ..runs import RunFolder, slug

#: fit flags that cv sets for each fold itself
OWN_FLAGS = ("--data.num_folds", "--data.fold", "--ckpt_path", "--group")
CV_FILE = "cv.json"


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` in ``args`` (``--flag value`` or ``--flag=value``), or None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def fold_run(cv: RunFolder, fold: int) -> RunFolder:
    """Fold ``fold``'s run: a normal run folder beside the cv run's, named ``<cv>-fold<i>``.

    Beside, not inside: each fold's run name is its W&B id, which must be unique in the project.
    """
    return RunFolder.new(f"{cv.name}-fold{fold}", cv.runs_dir)


def summarise(per_fold: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric found in every fold: its values in fold order, their mean and sample standard deviation."""
    names = sorted(set.intersection(*(set(m) for m in per_fold.values())))
    out = {}
    for name in names:
        values = [per_fold[run][name] for run in per_fold]
        out[name] = {"values": values, "mean": statistics.fmean(values), "std": statistics.stdev(values)}
    return out


def cv_table(per_fold: dict[str, dict[str, float]], summary: dict[str, dict[str, Any]]) -> str:
    """One row per metric: each fold's value, then mean ± sample standard deviation."""
    header = ["metric", *(f"fold{i}" for i in range(len(per_fold))), "mean ± std"]
    rows = [[name, *(f"{v:.4f}" for v in s["values"]), f"{s['mean']:.4f} ± {s['std']:.4f}"] for name, s in summary.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([rule, fmt(header), rule, *(fmt(r) for r in rows), rule])


def _settings(ns: argparse.Namespace, fit_args: list[str], cv: RunFolder) -> tuple[int, list[str]]:
    """The number of folds and the fit arguments: as given, or as the cv run was started with."""
    state_path = cv.root / CV_FILE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        k = ns.folds if ns.folds is not None else state["k"]
        if k != state["k"] or (fit_args and fit_args != state["fit_args"]):
            raise ValueError(
                f"cv run {cv.name!r} was started with K={state['k']} and the fit arguments {' '.join(state['fit_args'])!r}; "
                f"continue it with the same ones (or none: python -m cvtasks cv --run_name {cv.name}), "
                f"or start another with a new RUN=")
        return k, list(state["fit_args"])
    if not fit_args:
        raise FileNotFoundError(
            f"no cv run {cv.name!r} (no {state_path}); start one with make cv K=5 TASK=... RUN={cv.name}, "
            f"or list the runs with `ls {cv.runs_dir}/`")
    if ns.folds is None:
        raise ValueError("give the number of folds: make cv K=5 (python -m cvtasks cv --folds 5 ...)")
    return ns.folds, fit_args


def refuse_own_flags(fit_args: list[str], own_flags: Sequence[str], command: str, unit: str) -> None:
    """A ValueError naming the flags of ``own_flags`` in ``fit_args``: ``command`` sets them for each ``unit`` itself."""
    given = [f for f in own_flags if flag_value(fit_args, f) is not None]
    if given:
        raise ValueError(f"{command} sets {', '.join(given)} for each {unit} itself; drop {'it' if len(given) == 1 else 'them'} "
                         f"from the arguments")


def check_backbone_flag(fit_args: list[str]) -> None:
    """An unknown ``--model.backbone`` stops here, naming the closest names, not after the first run has started."""
    backbone = flag_value(fit_args, "--model.backbone")
    if backbone:
        from ..registry import get_backbone_entry

        get_backbone_entry(backbone)


def _check(k: int, fit_args: list[str]) -> None:
    """User errors, before any fold starts: too few folds, flags cv sets itself, an unknown backbone."""
    if k < 2:
        raise ValueError(f"K={k}: cross-validation needs at least 2 folds; use make cv K=5 (or --folds 5)")
    refuse_own_flags(fit_args, OWN_FLAGS, "cv", "fold")
    check_backbone_flag(fit_args)


def fit_or_resume(run: RunFolder, fit_args: list[str], label: str, env: Mapping[str, str] | None = None) -> int:
    """Train ``run`` in its own process with ``fit_args``, or continue it from its last.ckpt; returns the exit status.

    A process per run, as `make train` would start it: its own W&B run, DDP launch and memory.
    ``label`` names the run in the messages (``fold 2``); ``env`` is added to the process's environment.
    """
    runs_dir = str(run.runs_dir)
    if run.last_checkpoint.is_file() and run.config_path.is_file():
        print(f"{label}: continuing {run.name} from its last.ckpt", flush=True)
        args = ["resume", run.name, "--runs_dir", runs_dir]
    else:
        print(f"{label}: training {run.name}", flush=True)
        args = ["fit", *fit_args, "--run_name", run.name, "--runs_dir", runs_dir]
    return subprocess.run([sys.executable, "-m", "cvtasks", *args], env={**os.environ, **(env or {})}).returncode


def _run_fold(cv: RunFolder, fold: int, k: int, fit_args: list[str]) -> int:
    """Train fold ``fold`` (or continue it from last.ckpt); returns the exit status."""
    fold_args = [*fit_args, "--data.num_folds", str(k), "--data.fold", str(fold), "--group", cv.name]
    return fit_or_resume(fold_run(cv, fold), fold_args, f"fold {fold}")


def main(argv: list[str]) -> int:
    """``python -m cvtasks cv --folds K [--run_name NAME] [--runs_dir DIR] [fit arguments]``."""
    # no abbreviations: every other flag is a fit argument and must not match ours by prefix
    ap = argparse.ArgumentParser(prog="python -m cvtasks cv", description=__doc__, allow_abbrev=False,
                                 epilog="Other arguments go to each fold's fit, e.g. --config configs/classification.yaml "
                                        "--model.backbone resnet18. Run it again with the same name to continue: "
                                        "finished folds are kept, interrupted ones resume from last.ckpt.")
    ap.add_argument("--folds", type=int, default=None, help="K, the number of folds (each in turn the test set)")
    ap.add_argument("--run_name", default=None, help="the cv run's name; its folds are <name>-fold<i> (default: cv<K>-<backbone>-<time>)")
    ap.add_argument("--runs_dir", default="runs", help="where run folders live (default: runs)")
    ns, fit_args = ap.parse_known_args(argv)
    name = ns.run_name
    if not name:
        if not fit_args:
            raise ValueError("give the fit arguments (make cv K=5 TASK=... BACKBONE=...) or the name of a cv run to continue")
        name = f"cv{ns.folds}-{slug(flag_value(fit_args, '--model.backbone') or 'default')}-{time.strftime('%Y%m%d-%H%M%S')}"
    cv = RunFolder.new(name, ns.runs_dir)
    k, fit_args = _settings(ns, fit_args, cv)
    _check(k, fit_args)

    folds = [fold_run(cv, i) for i in range(k)]
    state = {"name": cv.name, "k": k, "fit_args": fit_args, "runs": [r.name for r in folds]}
    cv.root.mkdir(parents=True, exist_ok=True)
    (cv.root / CV_FILE).write_text(json.dumps(state, indent=2))
    for i, run in enumerate(folds):
        if run.metrics_path.is_file():
            print(f"fold {i}: {run.name} is finished (metrics.json), skipped", flush=True)
            continue
        status = _run_fold(cv, i, k, fit_args)
        if status != 0 or not run.metrics_path.is_file():
            print(f"cvtasks: fold {i} ({run.name}) stopped with exit status {status}; the finished folds are kept: "
                  f"run the same command again (RUN={cv.name}) to continue", file=sys.stderr)
            return status or 1

    per_fold = {run.name: run.metrics() for run in folds}
    summary = summarise(per_fold)
    state.update({"metrics": per_fold, "summary": summary})
    (cv.root / CV_FILE).write_text(json.dumps(state, indent=2))
    print(f"\n{k}-fold cross-validation {cv.name!r}: each fold's final metrics, mean ± sample standard deviation")
    print(cv_table(per_fold, summary))
    print(f"written to {cv.root / CV_FILE}")
    return 0
