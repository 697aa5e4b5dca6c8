"""`python -m cvtasks search`: trials as runs, the study in SQLite, processes sharing it, best.yaml, pruning, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from conftest import REPO, TINY_CLASSIFICATION_FIT
from cvtasks.__main__ import main as cvtasks_main
from cvtasks.commands import search
from cvtasks.runs import RunFolder

TINY = TINY_CLASSIFICATION_FIT
SPACE = """
model.lr: {type: float, low: 1e-4, high: 1.0e-1, log: true}     # YAML's 1e-4 is a string: read as the number
data.init_args.batch_size: {type: categorical, choices: [4, 8]}
model.init_args.label_smoothing: {type: float, low: 0.0, high: 0.2}
"""


@dataclass
class Searched:
    """A tiny search of 3 trials in one process, then 2 more by two processes sharing its SQLite study."""

    workdir: Path
    first: str  # what the 3-trial search printed
    after_first: list[optuna.trial.FrozenTrial]  # its study then
    shared: list[tuple[str, str]]  # the two processes' stdout and stderr
    first_metrics: dict[int, int]  # the first trials' metrics.json mtimes, before the two processes ran


def _print_config(args: list[str]) -> dict:
    """What `python -m cvtasks fit <args> --print_config` prints, parsed in this process (a second is saved per call)."""
    from cvtasks.cli import CvtasksCLI

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        CvtasksCLI(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def _study(workdir: Path, name: str = "s1") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'runs' / name / search.STUDY_DB}")


def _metrics_mtimes(workdir: Path, numbers: range) -> dict[int, int]:
    return {n: (workdir / "runs" / f"s1-trial{n}" / "metrics.json").stat().st_mtime_ns for n in numbers}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Searched:
    workdir = tmp_path_factory.mktemp("search")
    (workdir / "configs").symlink_to(REPO / "configs")
    (workdir / "space.yaml").write_text(SPACE)
    printed = io.StringIO()  # the search itself in this process (its trials' fits in their own, as always)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(workdir)
        mp.setenv("WANDB_MODE", "offline")
        status = cvtasks_main(["search", "--trials", "3", "--space", "space.yaml", "--run_name", "s1", *TINY])
    first = printed.getvalue()
    assert status == 0, first[-3000:]
    after_first, mtimes = _study(workdir).get_trials(), _metrics_mtimes(workdir, range(3))

    # the way a search outgrows one process: the same command (here: the name alone, a larger budget) twice at once
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_SERVICE", None)
    args = [sys.executable, "-m", "cvtasks", "search", "--run_name", "s1", "--trials", "5"]
    procs = [subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    shared = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, shared):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    return Searched(workdir, first, after_first, shared, mtimes)


def test_each_trial_is_a_run_with_its_sampled_values(searched: Searched) -> None:
    trials = searched.after_first
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        run = RunFolder.from_name(f"s1-trial{t.number}", searched.workdir / "runs")
        assert t.user_attrs["run"] == run.name
        config = run.config()
        assert config["model"]["init_args"]["lr"] == t.params["model.init_args.lr"]  # the short key, resolved
        assert config["data"]["init_args"]["batch_size"] == t.params["data.init_args.batch_size"]
        assert config["model"]["init_args"]["label_smoothing"] == t.params["model.init_args.label_smoothing"]
        assert 1e-4 <= t.params["model.init_args.lr"] <= 0.1 and config["group"] == "s1"
        assert t.value == run.metrics()["val/acc"]  # the monitored validation figure of the best checkpoint
        assert run.name in searched.first  # the table of trials
    assert len({t.params["model.init_args.lr"] for t in trials}) == 3


def test_two_processes_share_one_study_without_repeating_a_trial(searched: Searched) -> None:
    trials = _study(searched.workdir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and all(t.state == TrialState.COMPLETE for t in trials)
    trained = [line.split()[-1] for out, _ in searched.shared for line in out.splitlines() if ": training s1-trial" in line]
    assert sorted(trained) == ["s1-trial3", "s1-trial4"]  # each new trial trained once, by one of the two
    assert _metrics_mtimes(searched.workdir, range(3)) == searched.first_metrics  # the finished ones kept
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5


def test_best_yaml_is_the_best_trials_config_and_fit_takes_it(searched: Searched) -> None:
    best = _study(searched.workdir).best_trial
    path = searched.workdir / "runs" / "s1" / search.BEST_FILE
    config = yaml.safe_load(path.read_text())
    assert config["model"]["init_args"]["lr"] == best.params["model.init_args.lr"]
    assert config["data"]["init_args"]["batch_size"] == best.params["data.init_args.batch_size"]
    assert config["run_name"] is None and config["trainer"]["callbacks"] is None  # a new run, not the trial's
    printed = _print_config(["--config", str(path)])  # the fit's own parser takes it as it is
    assert printed["model"]["init_args"]["lr"] == best.params["model.init_args.lr"]
    assert printed["data"]["init_args"]["batch_size"] == best.params["data.init_args.batch_size"]
    assert f"make train ARGS='--config runs/s1/{search.BEST_FILE}'" in searched.first


def test_trial_pruning_stops_a_fit_worse_than_the_median(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="p", storage=url, direction="maximize", pruner=search.make_pruner())
    for value in (0.8, 0.85, 0.9, 0.82, 0.88):  # five finished trials, each reported after epochs 0 and 1
        trial = study.ask()
        trial.report(value, 0)
        trial.report(value, 1)
        study.tell(trial, value)
    module = SimpleNamespace(monitor="val/acc")

    def epoch_end(trial_id: int, value: float, epoch: int = 1) -> SimpleNamespace:
        trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, current_epoch=epoch, should_stop=False,
                                  callback_metrics={"val/acc": torch.tensor(value)},
                                  strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
        callback = search.TrialPruning()
        callback.setup(trainer, module, "fit")
        callback.on_validation_end(trainer, module)
        return trainer

    monkeypatch.setenv(search.ENV_STORAGE, url)
    monkeypatch.setenv(search.ENV_STUDY, "p")
    poor, good = study.ask(), study.ask()
    monkeypatch.setenv(search.ENV_TRIAL, str(poor._trial_id))
    assert epoch_end(poor._trial_id, 0.25).should_stop
    assert study.get_trials()[-2].user_attrs[search.PRUNED_ATTR] == 1 and study.get_trials()[-2].intermediate_values == {1: 0.25}
    monkeypatch.setenv(search.ENV_TRIAL, str(good._trial_id))
    assert not epoch_end(good._trial_id, 0.25, epoch=0).should_stop  # the first epoch is never pruned
    assert not epoch_end(good._trial_id, 0.875).should_stop
    monkeypatch.delenv(search.ENV_TRIAL)  # outside a search (a trial's run resumed by hand): inert
    assert not epoch_end(poor._trial_id, 0.0).should_stop


def test_a_dead_trial_is_taken_again_with_its_values_and_its_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "HEARTBEAT_S", 1)
    monkeypatch.setattr(search, "GRACE_S", 1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, storage = search.open_study("d", url, "maximize", seed=0)
    dead = search.take_trial(study, 1, url, seed=0)
    lr = dead.suggest_float("model.init_args.lr", 1e-4, 1e-1, log=True)
    dead.set_user_attr("run", "d-trial0")
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # its process died: no heartbeat for longer than the grace period

    again = search.take_trial(study, 1, url, seed=0)  # the budget of one is not used up by the dead trial
    assert again is not None and again.number == 1 and study.get_trials()[0].state == TrialState.FAIL
    assert again.user_attrs["run"] == "d-trial0"  # so its fit continues the dead one's run from last.ckpt
    assert again.suggest_float("model.init_args.lr", 1e-4, 1e-1, log=True) == lr
    study.tell(again, 0.5)
    assert search.take_trial(study, 1, url, seed=0) is None


def test_every_example_space_names_keys_of_its_tasks_config() -> None:
    spaces = sorted((REPO / "configs" / "search").glob("*.yaml"))
    assert {p.stem for p in spaces} == {p.stem for p in (REPO / "configs").glob("*.yaml")}  # one per task
    for path in spaces:
        config = _print_config(["--config", str(REPO / "configs" / f"{path.stem}.yaml")])
        resolved = search.resolve_keys(search.parse_space(yaml.safe_load(path.read_text()), path), config, path)
        assert len(resolved) >= 3 and all(k.key.split(".")[0] in config for k in resolved)
    with pytest.raises(ValueError, match=r"'model.init_args.lrr' is not a config key of this fit; did you mean "
                                         r"model.init_args.lr\b"):
        search.resolve_keys(search.parse_space({"model.init_args.lrr": {"type": "float", "low": 0.1, "high": 1}}, path),
                            config, path)


@pytest.mark.parametrize("space,args,expected", [
    (None, [], "no search space 'space.yaml'"),
    ("lr: {type: gaussian, low: 0, high: 1}", [], "unknown distribution type 'gaussian'; choose one of float, int, categorical"),
    ("lr: {type: float, lo: 0, high: 1}", [], "lr: a float takes low, high, log, step, not lo"),
    ("lr: {type: float, low: 1, high: 0.1}", [], "low (1) must be below high (0.1)"),
    ("lr: {type: float, low: 0, high: 1, log: true}", [], "log sampling needs low > 0"),
    ("bs: {type: categorical, choices: []}", [], "give the choices as a non-empty list"),
    ("bs: {type: int, low: 1.5, high: 4}", [], "low must be a whole number"),
    ("lr: 0.1", [], "give a mapping with a type"),
    ("model.lr: {type: float, low: 0.1, high: 1}", ["--trials", "0"], "a search needs at least one trial"),
    ("model.lr: {type: float, low: 0.1, high: 1}", ["--group", "g"], "search sets --group for each trial itself"),
    ("model.lr: {type: float, low: 0.1, high: 1}", ["--model.backbone", "vgg61"], "unknown backbone 'vgg61'"),
    ("model.lr: {type: float, low: 0.1, high: 1}", ["--storage", "nosuchdb://h/db"], "a database URL that SQLAlchemy reads"),
])
def test_search_user_errors_name_the_input_and_the_fix(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], space: str | None,
                                                       args: list[str], expected: str) -> None:
    monkeypatch.chdir(workdir)
    if space is not None:
        (workdir / "space.yaml").write_text(space)
    trials = [] if "--trials" in args else ["--trials", "2"]
    assert cvtasks_main(["search", *trials, "--space", "space.yaml", "--run_name", "bad", *TINY, *args]) == 2
    assert expected in capsys.readouterr().err
    assert not list(workdir.glob("runs/bad-trial*"))  # stopped before any trial


@pytest.mark.parametrize("args,expected", [
    (["--storage", "sqlite:////elsewhere/study.db"], "keeps its study in sqlite:////db-host/study.db; give that database again"),
    (["--trainer.max_epochs", "3"], "was started with the fit arguments"),
    ([], "keeps its study in sqlite:////db-host/study.db"),  # the name alone: the default file is another database
])
def test_a_started_search_continues_only_as_it_began(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "s3").mkdir(parents=True)
    state = {"space": yaml.safe_load(SPACE), "space_file": "space.yaml", "trials": 2, "fit_args": TINY,
             "storage": "sqlite:////db-host/study.db"}
    (tmp_path / "runs" / "s3" / search.STATE_FILE).write_text(json.dumps(state))
    assert cvtasks_main(["search", "--run_name", "s3", *args]) == 2
    assert expected in capsys.readouterr().err


def test_make_search_passes_trials_space_and_storage() -> None:
    out = subprocess.run(["make", "-n", "search", "TASK=segmentation", "TRIALS=7", "STORAGE=postgresql://u@h/db", "RUN=s"],
                         cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    line = " ".join(out.split("\\\n")).split("-m cvtasks search", 1)[1].split()
    assert line[:4] == ["--trials", "7", "--space", "configs/search/segmentation.yaml"]
    assert line[4:6] == ["--storage", "'postgresql://u@h/db'"] and line[line.index("--run_name") + 1] == "s"
