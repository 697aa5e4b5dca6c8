"""Hyperparameter search with Optuna: each trial a normal run, TPE sampling, median pruning, the best config as YAML.

The search space is a YAML file of config keys (as ``python -m cvtasks fit ... --print_config``
spells them) and their distributions::

    model.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    model.init_args.weight_decay: {type: float, low: 0.0, high: 0.1}
    trainer.max_epochs: {type: int, low: 2, high: 8, step: 2}
    data.init_args.batch_size: {type: categorical, choices: [16, 32, 64]}
    model.init_args.backbone: {type: categorical, choices: [resnet18, mobilenet_v2, vgg11_bn]}

``float`` and ``int`` take ``low``, ``high`` (both included), ``log`` (sample the logarithm evenly;
``low`` > 0) or ``step``; ``categorical`` takes ``choices`` (numbers, strings, booleans, null). A key
of a class's arguments may drop ``init_args`` (``model.lr``). Write numbers with a dot (``1.0e-4``):
YAML reads ``1e-4`` as a string (it is converted here all the same).

Each trial is one ``python -m cvtasks fit`` process on the search's fit arguments plus the trial's
values: a normal run folder ``<search>-trial<N>`` (W&B group ``<search>``). The study (TPE sampler,
seeded; median pruning on the task's monitored validation metric, reported after every epoch) lives
in ``runs/<search>/study.db`` (SQLite) or in ``--storage`` (any database URL Optuna takes, e.g.
``postgresql://user@host/db``): several processes or machines running the same command share the
study and run ``--trials`` trials between them. Running the command again continues the search: a
trial whose process died is run again with its values, from its run's last.ckpt. At the end:
``runs/<search>/best.yaml`` (the best trial's full config: ``make train ARGS='--config ...'`` takes it
as is), ``runs/<search>/search.json`` and the table of trials.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import fcntl
import io
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import yaml
from lightning import Callback, LightningModule, Trainer

from ..runs import RunFolder
from .cv import check_backbone_flag, fit_or_resume, refuse_own_flags

#: fit flags that search sets for each trial itself (--run_name is the search's own name)
OWN_FLAGS = ("--group", "--ckpt_path")
#: config keys a space may not set: search sets them for each trial
OWN_KEYS = ("run_name", "runs_dir", "group", "ckpt_path")
KINDS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}
STATE_FILE = "search.json"
STUDY_DB = "study.db"
BEST_FILE = "best.yaml"
#: each trial's fit finds its trial through these (the study's URL stays out of the run's config.yaml)
ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "CVTASKS_SEARCH_STORAGE", "CVTASKS_SEARCH_STUDY", "CVTASKS_SEARCH_TRIAL_ID"
PRUNING_CALLBACK = "cvtasks.commands.search.TrialPruning"
PRUNED_ATTR = "pruned_at_epoch"
#: a running trial's process records a heartbeat this often; after GRACE_S of silence it counts as dead
HEARTBEAT_S, GRACE_S = 30, 120
#: how often a trial whose process died is run again (with the same values) before it stays failed
MAX_RETRY = 2


# -- the search space ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One config key's distribution: float or int in [low, high] (log or stepped), or a categorical choice."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The trial's value for this key, sampled by the study's sampler (or fixed, for a trial run again)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))


def _number(path: Path, key: str, field: str, value: Any, integer: bool) -> float:
    """A bound as a number; YAML's ``1e-4`` (a string to YAML) is read as the number it means."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integer and number != int(number)):
        raise ValueError(f"{path}: {key}: {field} must be {'a whole number' if integer else 'a number'}, got {value!r}")
    return number


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    """One entry of the space file, checked: its type, its fields and their values."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{path}: {key}: give a mapping with a type, e.g. {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}} "
                         f"or {{type: categorical, choices: [16, 32]}}")
    kind = spec["type"]
    if kind not in KINDS:
        raise ValueError(f"{path}: {key}: unknown distribution type {kind!r}; choose one of {', '.join(KINDS)}")
    unknown = sorted(set(spec) - {"type", *KINDS[kind]})
    if unknown:
        raise ValueError(f"{path}: {key}: a {kind} takes {', '.join(KINDS[kind])}, not {', '.join(unknown)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{path}: {key}: give the choices as a non-empty list, e.g. choices: [16, 32, 64]")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ValueError(f"{path}: {key}: choices must be numbers, strings, booleans or null, got {bad!r}")
        return Dimension(key, kind, choices=tuple(choices))
    integer = kind == "int"
    missing = [f for f in ("low", "high") if f not in spec]
    if missing:
        raise ValueError(f"{path}: {key}: a {kind} needs {' and '.join(missing)}")
    low, high = (_number(path, key, f, spec[f], integer) for f in ("low", "high"))
    log = bool(spec.get("log", False))
    step = None if spec.get("step") is None else _number(path, key, "step", spec["step"], integer)
    if low >= high:
        raise ValueError(f"{path}: {key}: low ({spec['low']}) must be below high ({spec['high']})")
    if log and low <= 0:
        raise ValueError(f"{path}: {key}: log sampling needs low > 0, got {spec['low']}")
    if log and step is not None:
        raise ValueError(f"{path}: {key}: give log or step, not both")
    return Dimension(key, kind, low=low, high=high, log=log, step=step)


def parse_space(raw: Any, source: Path) -> list[Dimension]:
    """The search space ``raw`` (a mapping read from ``source``), every entry checked before any trial starts."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source}: the space is a mapping of config keys to distributions, e.g. "
                         f"model.init_args.lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}")
    return [_dimension(source, str(key), spec) for key, spec in raw.items()]


def read_space(path: Path) -> dict[str, Any]:
    """The space file's mapping as written (checked by ``parse_space``)."""
    if not path.is_file():
        examples = ", ".join(sorted(map(str, Path("configs/search").glob("*.yaml")))) or "configs/search/classification.yaml"
        raise FileNotFoundError(f"no search space {str(path)!r}; pass SPACE=configs/search/<task>.yaml (e.g. {examples}) "
                                f"or write one (python -m cvtasks search --help shows the format)")
    raw = yaml.safe_load(path.read_text())
    parse_space(raw, path)
    return raw


def _leaf_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of ``config`` (nested mappings joined by dots)."""
    if not isinstance(config, dict):
        return [prefix] if prefix else []
    keys = [prefix] if prefix else []
    for k, v in config.items():
        keys += _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def resolve_keys(space: list[Dimension], config: dict[str, Any], path: Path) -> list[Dimension]:
    """The space with each key spelled in full as in ``config`` (``model.lr`` -> ``model.init_args.lr``); unknown keys are errors."""
    from dataclasses import replace

    known = set(_leaf_keys(config))
    resolved = []
    for dim in space:
        head, _, rest = dim.key.partition(".")
        candidates = [dim.key, f"{head}.init_args.{rest}"] if rest else [dim.key]
        key = next((k for k in candidates if k in known), None)
        if key is None:
            close = difflib.get_close_matches(dim.key, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{path}: {dim.key!r} is not a config key of this fit{hint} The keys are those of "
                             f"python -m cvtasks fit <the same arguments> --print_config")
        if key.split(".")[0] in OWN_KEYS:
            raise ValueError(f"{path}: search sets {key} for each trial itself; drop it from the space")
        resolved.append(replace(dim, key=key))
    return resolved


def _cli_value(value: Any) -> str:
    """A sampled value as the CLI reads it back: strings as they are, the rest spelled as YAML (true, null, 1.0e-05)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _shown(value: Any) -> str:
    """A sampled value for people: floats to four significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else _cli_value(value)


def _short(key: str) -> str:
    """A config key's last part, for tables and messages (``model.init_args.lr`` -> ``lr``)."""
    return key.rsplit(".", 1)[-1]


def _set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``config`` to ``value``."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


# -- the fit's base config -----------------------------------------------------------------------
def base_config(fit_args: list[str]) -> dict[str, Any]:
    """The full config the fit arguments resolve to (``fit ... --print_config``): checks them, and is best.yaml's base.

    Parsed here, by the fit's own parser, which prints the config and exits before building anything.
    """
    from ..cli import CvtasksCLI

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            CvtasksCLI(["fit", *fit_args, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):  # the parser has said why on stderr
            raise ValueError("the fit arguments were refused before any trial (the parser's message is above); "
                             "fix them and start again") from None
    return yaml.safe_load(printed.getvalue()) or {}


def task_class(config: dict[str, Any]) -> type:
    """The task class named by the config's ``model.class_path``."""
    import importlib

    module, _, name = ((config.get("model") or {}).get("class_path") or "").rpartition(".")
    if not module:
        raise ValueError("the fit arguments name no task (model.class_path); give a task config, "
                         "e.g. --config configs/classification.yaml")
    return getattr(importlib.import_module(module), name)


# -- the study -----------------------------------------------------------------------------------
@contextmanager
def _optuna_experimental() -> Iterator[None]:
    """Optuna's crash recovery (heartbeats, retrying a dead trial) is marked experimental: used on purpose, unwarned."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def _retry_callback() -> Any:
    """Queues a dead trial again with its values and user_attrs (Optuna 4.9 renamed RetryFailedTrialCallback)."""
    from optuna import storages

    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def make_pruner() -> Any:
    """Median pruning: stop a trial whose figure after an epoch is worse than the median of the others' there.

    Not before five trials have finished (their medians mean something) nor in the first epoch (every
    net is still near chance).
    """
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def _sampler(seed: int) -> Any:
    """TPE; ``constant_liar`` keeps processes sharing a study from sampling next to each other's running trials."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def trial_seed(seed: int, number: int) -> int:
    """Trial ``number``'s sampler seed: mixed from both (seeds 0, 1, 2 would start their random streams alike)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL, else None."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (processes on one machine sharing an SQLite study take turns)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def study_lock(url: str) -> ContextManager[None]:
    """The lock that makes "count the trials, then take one" a single step: a file lock beside an SQLite study.

    A database on another machine has none; there, a trial taken past the budget in a race gives its place back (see
    ``take_trial``).
    """
    db = _sqlite_path(url)
    return _file_lock(db.with_name(db.name + ".lock")) if db is not None else nullcontext()


def check_storage(url: str) -> None:
    """A storage URL that SQLAlchemy cannot read, or whose driver is not installed, stops the search before it starts."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url).get_dialect().import_dbapi()  # no connection yet: nothing reaches the network
    except (ArgumentError, ImportError) as exc:
        raise ValueError(f"STORAGE={url.rsplit('@', 1)[-1]}: {exc}; give a database URL that SQLAlchemy reads "
                         f"(sqlite:////abs/path.db, postgresql://user@host/db, mysql://...) with its driver installed "
                         f"(e.g. pip install psycopg for PostgreSQL)") from None


def open_study(name: str, url: str, direction: str, seed: int) -> tuple[Any, Any]:
    """The study ``name`` in ``url`` (created on first use) and its storage, with heartbeats for crash recovery."""
    import optuna
    from optuna.storages import RDBStorage

    db = _sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with study_lock(url), _optuna_experimental():  # two processes starting together must not both create the tables
        storage = RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if db is not None else None,
            heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            # a trial whose process stopped beating is queued again with its values (and its run, in user_attrs)
            heartbeat_stale_trial_callback=_retry_callback()(max_retry=MAX_RETRY),
        )
        study = optuna.create_study(study_name=name, storage=storage, sampler=_sampler(seed), pruner=make_pruner(),
                                    direction=direction, load_if_exists=True)
    return study, storage


def _counted(trials: list[Any]) -> list[Any]:
    """The trials that use up the budget: all but those run again after their process died, and places given back."""
    with _optuna_experimental():
        retried = {n for t in trials for n in _retry_callback().retry_history(t)}
    return [t for t in trials if t.number not in retried and not t.user_attrs.get("surplus")]


def take_trial(study: Any, budget: int, url: str, seed: int) -> Any | None:
    """The next trial of the study if the budget allows (a trial run again comes first), else None."""
    import optuna
    from optuna.trial import TrialState

    with study_lock(url):
        with _optuna_experimental():
            optuna.storages.fail_stale_trials(study)  # dead processes' trials: failed, and queued again
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(_counted(trials)) >= budget:
            return None
        with warnings.catch_warnings():  # Optuna expects heartbeats with Study.optimize; here run_trial beats them
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
    # seeded per trial number: reproducible alone, and processes sharing the study sample apart
    study.sampler = _sampler(trial_seed(seed, trial.number))
    counted = _counted(study.get_trials(deepcopy=False))
    if sum(t.number <= trial.number for t in counted) > budget:  # raced past the budget (no lock across machines)
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


@contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat while its fit runs, so that other processes can tell a live trial from a dead one."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _frozen(study: Any, number: int) -> Any:
    """The stored state of trial ``number`` (what the fit's process wrote to it included)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def run_trial(study: Any, storage: Any, url: str, trial: Any, space: list[Dimension], fit_args: list[str],
              search: RunFolder, monitor: str) -> None:
    """Train one trial as a normal run in its own process and tell the study how it went."""
    from optuna.trial import TrialState

    params = {dim.key: dim.suggest(trial) for dim in space}
    # a trial run again after its process died continues that process's run (its user_attrs came with it)
    run = RunFolder.new(trial.user_attrs.get("run") or f"{search.name}-trial{trial.number}", search.runs_dir)
    trial.set_user_attr("run", run.name)
    values = [arg for key, value in params.items() for arg in (f"--{key}", _cli_value(value))]
    args = [*fit_args, *values, "--group", search.name, f"--trainer.callbacks+={PRUNING_CALLBACK}"]
    env = {ENV_STORAGE: url, ENV_STUDY: study.study_name, ENV_TRIAL: str(trial._trial_id)}
    label = f"trial {trial.number} ({', '.join(f'{_short(k)}={_shown(v)}' for k, v in params.items())})"
    try:
        if run.metrics_path.is_file():  # run again after its process died between the fit's end and the study's record
            print(f"{label}: {run.name} had finished (metrics.json); its figures are taken", flush=True)
            status = 0
        else:
            with heartbeat(storage, trial._trial_id):
                status = fit_or_resume(run, args, label, env)
    except KeyboardInterrupt:
        # failed and queued again at once, so that the same command started again continues this run
        study.tell(trial, state=TrialState.FAIL)
        with _optuna_experimental():
            _retry_callback()(max_retry=MAX_RETRY)(study, _frozen(study, trial.number))
        print(f"\nsearch interrupted; run the same command again to continue (trial {trial.number} continues from "
              f"{run.last_checkpoint})", file=sys.stderr)
        raise
    if status == 0 and run.metrics_path.is_file():
        pruned_at = _frozen(study, trial.number).user_attrs.get(PRUNED_ATTR)
        if pruned_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"trial {trial.number}: pruned after epoch {pruned_at}", flush=True)
        else:
            value = run.metrics()[monitor]
            study.tell(trial, value)
            print(f"trial {trial.number}: {monitor} = {value:.4f}", flush=True)
        return
    study.tell(trial, state=TrialState.FAIL)
    if not run.config_path.is_file():  # refused before training: every trial would be
        raise ValueError(f"trial {trial.number}'s fit stopped before training (exit status {status}; its error is above): "
                         f"fix the fit arguments or the space, then start a new search")
    print(f"trial {trial.number}: failed (exit status {status}); its run is {run.root}; the search goes on", flush=True)


# -- the results ---------------------------------------------------------------------------------
def trials_table(study: Any, monitor: str) -> str:
    """One row per trial: number, state, the monitored figure, the values, the run."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", "state", monitor, *map(_short, keys), "run"]
    rows = [[str(t.number), t.state.name.lower(), "-" if t.value is None else f"{t.value:.4f}",
             *(_shown(t.params[k]) if k in t.params else "-" for k in keys), str(t.user_attrs.get("run", "-"))]
            for t in trials]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([rule, fmt(header), rule, *(fmt(r) for r in rows), rule])


def best_config(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config with the best trial's values: what that trial's fit ran, minus its run's own name."""
    best = copy.deepcopy(config)
    for key, value in params.items():
        _set_key(best, key, value)
    return best


def write_best(search: RunFolder, study: Any, config: dict[str, Any], monitor: str) -> Path | None:
    """runs/<search>/best.yaml from the best finished trial, or None while no trial has finished."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    path = search.root / BEST_FILE
    header = (f"# The best trial of search {search.name}: trial {best.number}, {monitor} = {best.value:.4f} "
              f"(run {best.user_attrs.get('run')}).\n# Train it: make train ARGS='--config {path}'\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(best_config(config, best.params), sort_keys=False))
    os.replace(tmp, path)  # processes sharing the study may finish together
    return path


def _write_state(search: RunFolder, state: dict[str, Any]) -> None:
    """search.json, replaced in one step (processes sharing the study write it too)."""
    search.root.mkdir(parents=True, exist_ok=True)
    tmp = search.root / (STATE_FILE + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, search.root / STATE_FILE)


def _settings(ns: argparse.Namespace, fit_args: list[str], search: RunFolder) -> tuple[int, dict[str, Any], list[str]]:
    """The budget, the state (the space as written included) and the fit arguments: as given, or as the search began."""
    path = search.root / STATE_FILE
    raw = None if ns.space is None else read_space(ns.space)
    if path.is_file():
        state = json.loads(path.read_text())
        if (fit_args and fit_args != state["fit_args"]) or (raw is not None and raw != state["space"]):
            raise ValueError(f"search {search.name!r} was started with the fit arguments {' '.join(state['fit_args'])!r} and "
                             f"the space in {state['space_file']}; continue it with the same ones (or none: python -m cvtasks "
                             f"search --run_name {search.name}), or start another with a new RUN=")
        return ns.trials or state["trials"], state, list(state["fit_args"])
    if not fit_args:
        raise FileNotFoundError(f"no search {search.name!r} (no {path}); start one with make search TASK=... RUN={search.name}, "
                                f"or list the runs with `ls {search.runs_dir}/`")
    if raw is None:
        raise ValueError("give the search space: make search SPACE=configs/search/<task>.yaml "
                         "(python -m cvtasks search --space ...)")
    if not ns.trials:
        raise ValueError("give the number of trials: make search TRIALS=20 (python -m cvtasks search --trials 20)")
    return ns.trials, {"space": raw, "space_file": str(ns.space)}, fit_args


def main(argv: list[str]) -> int:
    """``python -m cvtasks search --trials N --space SPACE.yaml [--storage URL] [--run_name NAME] [fit arguments]``."""
    ap = argparse.ArgumentParser(prog="python -m cvtasks search", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Other arguments go to each trial's fit, e.g. --config configs/classification.yaml "
                                        "--trainer.max_epochs 5.")
    ap.add_argument("--trials", type=int, default=None, help="trials in all, over every process sharing the study")
    ap.add_argument("--space", type=Path, default=None, help="the search space YAML, e.g. configs/search/classification.yaml")
    ap.add_argument("--storage", default=None, help="the study's database URL (default: sqlite in runs/<name>/study.db)")
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed (each trial's mixes it with the trial's number)")
    ap.add_argument("--run_name", default=None, help="the search's name: the study's, and runs/<name>/ (default: search-<time>)")
    ap.add_argument("--runs_dir", default="runs", help="where run folders live (default: runs)")
    ns, fit_args = ap.parse_known_args(argv)
    if ns.trials is not None and ns.trials < 1:
        raise ValueError(f"TRIALS={ns.trials}: a search needs at least one trial; use make search TRIALS=20")
    if not ns.run_name and not fit_args:
        raise ValueError("give the fit arguments (make search TASK=... SPACE=...) or the name of a search to continue (RUN=)")
    search = RunFolder.new(ns.run_name or f"search-{time.strftime('%Y%m%d-%H%M%S')}", ns.runs_dir)
    budget, state, fit_args = _settings(ns, fit_args, search)
    space = parse_space(state["space"], Path(state["space_file"]))
    refuse_own_flags(fit_args, OWN_FLAGS, "search", "trial")
    check_backbone_flag(fit_args)
    url = ns.storage or f"sqlite:///{(search.root / STUDY_DB).resolve()}"
    check_storage(url)
    shown_url = _shown_url(url)
    if state.get("storage", shown_url) != shown_url:  # the study would silently start again elsewhere
        raise ValueError(f"search {search.name!r} keeps its study in {state['storage']}; give that database again "
                         f"(STORAGE=..., or none for the default SQLite file), or start another search with a new RUN=")

    config = base_config(fit_args)  # the fit arguments' errors stop here, before the study exists
    space = resolve_keys(space, config, Path(state["space_file"]))
    task = task_class(config)
    state.update({"name": search.name, "trials": budget, "fit_args": fit_args, "monitor": task.monitor, "storage": shown_url})
    _write_state(search, state)

    study, storage = open_study(search.name, url, "maximize" if task.monitor_mode == "max" else "minimize", ns.seed)
    print(f"search {search.name}: {budget} trials in all, {task.monitor} ({task.monitor_mode}imised), study in {shown_url}",
          flush=True)
    while (trial := take_trial(study, budget, url, ns.seed)) is not None:
        run_trial(study, storage, url, trial, space, fit_args, search, task.monitor)
    return report(search, study, config, task.monitor, state)


def _shown_url(url: str) -> str:
    """The storage URL with its password hidden: what search.json and the messages show."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def report(search: RunFolder, study: Any, config: dict[str, Any], monitor: str, state: dict[str, Any]) -> int:
    """Print the trials, write best.yaml and search.json; 0 once a trial has finished, else 1."""
    print(f"\nsearch {search.name}: the trials of every process sharing the study")
    print(trials_table(study, monitor))
    trials = study.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state.name == "RUNNING"]
    if running:
        print(f"trials {running} are still running in other processes; best.yaml is of the finished ones")
    best = write_best(search, study, config, monitor)
    state["results"] = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                         "run": t.user_attrs.get("run")} for t in trials]
    state["best"] = None if best is None else next(r for r in state["results"] if r["number"] == study.best_trial.number)
    _write_state(search, state)
    if best is None:
        print("no trial has finished, so there is no best config yet")
        return 1
    print(f"best: trial {study.best_trial.number}, {monitor} = {study.best_value:.4f}; its config: {best}\n"
          f"train it: make train ARGS='--config {best}'")
    return 0


# -- inside each trial's fit ---------------------------------------------------------------------
class TrialPruning(Callback):
    """Reports the task's monitored metric to the search's trial after every validation; stops the fit if it is pruned.

    ``search`` adds it to each trial's fit; the trial is named by the environment the search sets
    (``CVTASKS_SEARCH_*``), so a trial's run resumed by hand, outside a search, trains on untouched.
    A pruned fit stops like an early-stopped one (its best checkpoint is evaluated, metrics.json
    written) and the search records the trial as pruned: raising ``optuna.TrialPruned`` here would
    end the fit's process with an error instead.
    """

    def __init__(self) -> None:
        self.trial: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the trial (process 0 only: it alone reports)."""
        if stage != "fit" or not trainer.is_global_zero or not os.environ.get(ENV_TRIAL):
            return
        import optuna

        study = optuna.load_study(study_name=os.environ[ENV_STUDY], storage=os.environ[ENV_STORAGE], pruner=make_pruner())
        self.trial = optuna.trial.Trial(study, int(os.environ[ENV_TRIAL]))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report this epoch's figure; on every process, stop the fit if the pruner says so."""
        if trainer.sanity_checking or not os.environ.get(ENV_TRIAL):
            return
        prune = False
        value = trainer.callback_metrics.get(getattr(pl_module, "monitor", ""))
        if self.trial is not None and value is not None:
            from optuna.exceptions import UpdateFinishedTrialError

            epoch = trainer.current_epoch
            try:
                self.trial.report(float(value), epoch)
                prune = self.trial.should_prune()
                if prune:
                    self.trial.set_user_attr(PRUNED_ATTR, epoch)
            except UpdateFinishedTrialError:  # the search has moved on from this trial: train on, report nothing
                self.trial = None
        if trainer.strategy.broadcast(prune, src=0):
            print(f"trial pruned after epoch {trainer.current_epoch}: its {pl_module.monitor} is worse than the median of "
                  f"the other trials' there", flush=True)
            trainer.should_stop = True
