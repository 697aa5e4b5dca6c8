"""`python -m cvtasks cv`: a normal run per fold, cv.json with mean ± std, continuing an interrupted cv, clear errors."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, TINY_CLASSIFICATION_FIT, run_cli
from cvtasks.__main__ import main as cvtasks_main
from cvtasks.runs import RunFolder

TINY = [*TINY_CLASSIFICATION_FIT, "--data.batch_size", "8"]


def test_cv_runs_each_fold_and_continues_only_unfinished_ones(workdir: Path) -> None:
    proc = run_cli(["cv", "--folds", "3", "--run_name", "cv1", *TINY], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = workdir / "runs"
    folds = [RunFolder.from_name(f"cv1-fold{i}", runs) for i in range(3)]
    for i, run in enumerate(folds):  # each fold a normal run: its config says which fold is its test set
        data = run.config()["data"]["init_args"]
        assert (data["num_folds"], data["fold"]) == (3, i) and run.config()["group"] == "cv1"
        assert run.best_checkpoint.is_file() and run.last_checkpoint.is_file()
    state = json.loads((runs / "cv1" / "cv.json").read_text())
    assert state["k"] == 3 and state["runs"] == [r.name for r in folds]
    for name in ("test/acc", "val/loss"):
        values = [run.metrics()[name] for run in folds]
        assert state["metrics"][folds[1].name][name] == values[1]
        assert state["summary"][name]["values"] == values
        assert state["summary"][name]["mean"] == pytest.approx(sum(values) / 3, abs=1e-12)
        assert state["summary"][name]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    row = [line for line in proc.stdout.splitlines() if line.startswith("test/acc ")][-1]  # the cv table comes last
    assert row.split()[-3:] == [f"{state['summary']['test/acc']['mean']:.4f}", "±", f"{state['summary']['test/acc']['std']:.4f}"]

    # interrupted: fold 1 trained but was not evaluated (last.ckpt, no metrics.json); fold 2 never started
    finished = {p: p.stat().st_mtime_ns for p in (folds[0].metrics_path, folds[0].last_checkpoint)}
    folds[1].metrics_path.unlink()
    for p in sorted(folds[2].root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    folds[2].root.rmdir()
    again = run_cli(["cv", "--run_name", "cv1"], workdir)  # the name alone: the rest is read from cv.json
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "fold 0: cv1-fold0 is finished (metrics.json), skipped" in again.stdout
    assert "fold 1: continuing cv1-fold1 from its last.ckpt" in again.stdout
    assert "fold 2: training cv1-fold2" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    state = json.loads((runs / "cv1" / "cv.json").read_text())
    assert all(run.metrics_path.is_file() for run in folds)
    assert state["summary"]["test/acc"]["values"] == [run.metrics()["test/acc"] for run in folds]


@pytest.mark.parametrize("args,expected", [
    (["--folds", "1", *TINY], "K=1: cross-validation needs at least 2 folds; use make cv K=5"),
    (["--folds", "3", *TINY, "--model.backbone", "vgg61"], "unknown backbone 'vgg61'"),
    (["--folds", "3", *TINY, "--data.fold", "1"], "cv sets --data.fold for each fold itself; drop it"),
    (["--run_name", "nothing-here"], "no cv run 'nothing-here'"),
    ([*TINY], "give the number of folds: make cv K=5"),
])
def test_cv_user_errors_name_the_input_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert cvtasks_main(["cv", *args]) == 2
    assert expected in capsys.readouterr().err
    assert not any((tmp_path / "runs").glob("*/config.yaml"))  # stopped before any fold started


def test_cv_refuses_other_arguments_for_a_started_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cv2").mkdir(parents=True)
    (tmp_path / "runs" / "cv2" / "cv.json").write_text(json.dumps({"k": 3, "fit_args": TINY}))
    assert cvtasks_main(["cv", "--folds", "4", "--run_name", "cv2", *TINY]) == 2
    assert "was started with K=3" in capsys.readouterr().err


def test_folds_are_grouped_in_wandb(tmp_path: Path) -> None:
    from jsonargparse import Namespace

    from cvtasks.cli import CvtasksCLI
    from cvtasks.loggers import AutoWandbLogger

    cli = CvtasksCLI.__new__(CvtasksCLI)  # only the logger set-up, with the real W&B logger class
    cli.run = RunFolder.new("cv1-fold0", tmp_path)
    cfg = Namespace(run_name="cv1-fold0", group="cv1", trainer=Namespace(
        logger={"class_path": "cvtasks.loggers.AutoWandbLogger", "init_args": {"project": "cvtasks", "mode": "offline"}}))
    cli._configure_loggers(cfg)
    logger = AutoWandbLogger(**cfg.trainer.logger["init_args"])  # offline and lazy: nothing starts until it logs
    assert logger._wandb_init["group"] == "cv1" and logger._wandb_init["id"] == "cv1-fold0"


def test_make_cv_passes_k_and_the_run() -> None:
    out = subprocess.run(["make", "-n", "cv", "K=3", "RUN=cv1", "EPOCHS=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=60).stdout
    line = next(l for l in out.splitlines() if "-m cvtasks" in l).split()
    assert line[1:5] == ["-m", "cvtasks", "cv", "--folds"] and line[5] == "3"
    assert line[-2:] == ["--run_name", "cv1"] and "--trainer.max_epochs" in line
