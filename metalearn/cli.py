"""`metalearn <command> [Hydra overrides]`: dispatch to one Hydra app per command.

`train` and `eval` are ordinary Hydra apps, so every Hydra flag works
(`--help`, `--cfg job`, `-m`, `hydra.run.dir=...`). `resume=<run>` and
`eval run=<run>` replay the run's saved overrides (.hydra/overrides.yaml)
before the new ones, so the run's own config is composed again and any
override given now still applies.
"""

import contextlib
import functools
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from metalearn.config.compose import compose
from metalearn.config.migrate import migrate
from metalearn.config.schema import register_schemas
from metalearn.errors import MetalearnError, RunFailed
from metalearn.export.format import is_export, record_folder
from metalearn.storage.run_folder import (
    NewRunFolder,
    find_override,
    override_key,
    quoted,
    refuse_existing_run,
    refuse_long_names,
    replay_run_overrides,
    run_list,
    saved_overrides,
)
from metalearn.storage.run_lock import lock_run, release

CONFIG_PATH = "pkg://metalearn.conf"
USAGE = """usage: metalearn <command> [overrides ...]

commands:
  train   meta-train a model; each run gets its own folder under runs/
          e.g. metalearn train algo=maml data.root=/data
               metalearn train -m algo=maml,fomaml seed=0,1,2
               metalearn train resume=<run folder> [train.steps=...]
               torchrun --nproc_per_node=4 -m metalearn train device=cuda   (one run on 4 GPUs)
  eval    evaluate a run's checkpoint on test-split episodes (accuracy ± 95% CI)
          e.g. metalearn eval run=<run folder> [checkpoint=best|last] [eval.episodes=600]
               metalearn eval 'run=[<run>,<run>,<run>]'   (an ensemble, next to each member)
               metalearn eval run=<run folder> checkpoint=top5   (its 5 best, train.keep_best=5)
               metalearn eval run=<omniglot run> data=mnist     (cross-domain)
  export  a run's weights alone as safetensors (no pickle), its config as metadata
          e.g. metalearn export run=<run folder> [checkpoint=best] [out=model.safetensors]
               metalearn eval run=model.safetensors            (scored like the run)
  report  a sweep's runs grouped by their settings: a table (also CSV, Markdown) and plots
          e.g. metalearn report runs/multirun/<time> [more folders] [out=<folder>] [--eval]
               (--eval first scores the runs that have no test result)
  data    look at a dataset: `data info` (classes and images per split, cache)
          or `data preview` (a PNG of one sampled episode)
          e.g. metalearn data info data=mnist data.root=/data
               metalearn data preview data=omniglot task.ways=5 task.shots=1 [part=val] [out=x.png]

`metalearn <command> --help` lists the config groups and keys of a command;
`metalearn <command> --cfg job [overrides]` prints the composed config.
"""


def _fail(message: str, code: int = 1) -> None:
    if _in_sweep():
        _fail_sweep_run(message)
    print(f"metalearn: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail_sweep_run(message: str) -> None:
    """One run of a sweep failed: its log says why, and the sweep goes on (an exception, not an exit)."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    logging.getLogger("metalearn").error(message)
    raise RunFailed(f"metalearn: error: run {HydraConfig.get().runtime.output_dir} failed: {message}")


def _out_of_memory(err: BaseException) -> bool:
    import torch

    text = str(err)
    return (
        isinstance(err, getattr(torch, "OutOfMemoryError", ()))
        or "can't allocate memory" in text
        or ("out of memory" in text.lower())
    )


def _user_errors_exit(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """A MetalearnError ends the command with its message, not a traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        try:
            return task(cfg)
        except RunFailed:
            raise
        except MetalearnError as err:
            _fail(str(err))
        except OSError as err:  # a file that cannot be read or written: say which and why, not a traceback
            where = f" {err.filename}" if err.filename else ""
            _fail(f"could not access{where}: {err.strerror or err}. Nothing already saved was changed.")
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and not _out_of_memory(err):
                raise
            _fail(
                f"out of memory ({_one_paragraph(err)[:300]}). Nothing already saved was changed: choose smaller "
                f"settings (train.meta_batch_size, task.ways, eval.batch_size, a smaller model: model.hidden or "
                f"model.channels); for MAML, first order (algo.first_order=true) or fewer algo.inner_steps; "
                f"or another device."
            )

    return wrapper


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@_user_errors_exit
def train_app(cfg: DictConfig) -> float | None:
    """One run; returns its best validation accuracy (an Optuna study's objective), None if none was scored.

    A single run refused before it started leaves no folder: main() removes what was made for it.
    """
    from hydra.core.hydra_config import HydraConfig

    from metalearn.distributed import from_environment
    from metalearn.storage.run_lock import one_writer
    from metalearn.train import train

    if not from_environment().main:  # rank 0 alone writes the run folder
        return train(cfg).best_val_accuracy
    # A single run's lock is main()'s already; a sweep's run takes its folder's here.
    with one_writer(Path(HydraConfig.get().runtime.output_dir)):
        return train(cfg).best_val_accuracy


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@_user_errors_exit
def eval_app(cfg: DictConfig) -> None:
    from metalearn.evaluate import evaluate

    evaluate(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
@_user_errors_exit
def export_app(cfg: DictConfig) -> None:
    from metalearn.export.write import export

    export(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="data")
@_user_errors_exit
def data_app(cfg: DictConfig) -> None:
    from metalearn.commands.data import run

    run(cfg)


COMMANDS = {"train": train_app, "eval": eval_app, "export": export_app, "data": data_app}
DATA_ACTIONS = ("info", "preview")


def _writable(log: Path, purpose: str) -> None:
    """Refuse, before Hydra opens it, a run folder whose log cannot be written."""
    if not log.parent.is_dir():
        return  # not a run folder: the replay says so
    try:
        with open(log, "a"):
            pass
    except OSError as err:
        raise MetalearnError(
            f"cannot write {log} ({err.strerror or err}), so metalearn cannot {purpose} in that folder. Nothing "
            f"was changed; make the folder writable (or copy it somewhere writable) and run the command again."
        ) from None


def _can_create(folder: Path) -> None:
    """A new run's folder can be made and written, before Hydra tries."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise MetalearnError(
            f"cannot write in {folder} ({err.strerror or err}): a run needs a writable folder. Run from a "
            f"writable directory or choose one with hydra.run.dir=<folder>."
        ) from None


def _eval_log(run: str) -> list[str]:
    """Evaluation logs to <run>/eval.log; a run folder that cannot take it logs to a temporary file instead."""
    log = record_folder(run) / "eval.log"
    try:
        with open(log, "a"):
            pass
        return []
    except OSError as err:
        elsewhere = Path(tempfile.gettempdir()) / f"metalearn-eval-{os.getpid()}.log"
        print(f"metalearn: note: cannot write {log} ({err.strerror or err}); logging to {elsewhere}", file=sys.stderr)
        return [f"hydra.job_logging.handlers.file.filename={quoted(str(elsewhere))}"]


# Hydra plugins behind a config choice (group, choice prefix), and their modules: the `sweep` extra.
PLUGINS = {
    ("hydra/launcher", "joblib"): "hydra_plugins.hydra_joblib_launcher",
    ("hydra/launcher", "submitit"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/sweeper", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
    ("hparams_search", ""): "hydra_plugins.hydra_optuna_sweeper",  # every preset is an Optuna study
}


def _require_plugins(args: list[str]) -> None:
    """A launcher or sweeper whose plugin is not installed: one line that names the extra to install."""
    import importlib

    for arg in args:
        group, _, choice = arg.lstrip("+~").partition("=")
        for (plugin_group, prefix), module in PLUGINS.items():
            if group != plugin_group or not choice.startswith(prefix):
                continue
            try:
                importlib.import_module(module)
            except ImportError:
                raise MetalearnError(f'{group}={choice} needs the sweep extra: pip install ".[sweep]".') from None


def _register_study_sweeper() -> None:
    """hparams_search's sweeper, known to Hydra however metalearn was installed (an editable install's
    hydra_plugins folder is not scanned), by Hydra's documented manual registration."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.metalearn_study.optuna_study import OptunaStudy

    Plugins.instance().register(OptunaStudy)


def _resolved_run_dir(args: list[str]) -> Path:
    """The folder a new run gets, interpolations (${now:...}, ${algo.name}, ${hydra.job.override_dirname})
    resolved as Hydra resolves them; a bad override is an error here."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(args, "train", with_hydra=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise MetalearnError(_one_paragraph(err)) from None
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(cfg)  # for ${hydra:...}, as Hydra's run_job does
        return Path(os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir"))))
    except OmegaConfBaseException as err:
        given = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
        raise MetalearnError(f"hydra.run.dir={given} cannot be resolved: {_one_paragraph(err)}") from None
    finally:
        hydra_config.cfg = previous


def _claim_new_run(args: list[str], claims: contextlib.ExitStack, command_line: str) -> list[str]:
    """A new run's folder, resolved once and given to Hydra as is (so ${now:...} cannot name another folder),
    checked, made and locked before Hydra writes anything there; a refused run leaves no folder behind."""
    folder = _resolved_run_dir(args)
    refuse_long_names(folder)
    refuse_existing_run(folder)  # before anything is written there
    if not _main_process():
        return args  # rank 0 makes and locks the folder; _join_ranks gives this process its name
    new = NewRunFolder(folder)
    claims.push(_discard_if_failed(new))
    _can_create(folder)
    lock_run(folder, command_line)
    new.owned = True  # what appears in it from now on is this process's
    claims.callback(release, folder)
    refuse_existing_run(folder)  # again: a run may have finished there since, before this process had the lock
    return [a for a in args if override_key(a) != "hydra.run.dir"] + [f"hydra.run.dir={quoted(str(folder))}"]


def _discard_if_failed(new: NewRunFolder):
    """An exit handler: a command that fails leaves the new run's folder as it found it."""

    def on_exit(kind, err: BaseException | None, trace) -> bool:
        if err is not None and not (isinstance(err, SystemExit) and err.code in (0, None)):
            new.discard()
        return False  # the error goes on

    return on_exit


def _prepare(command: str, args: list[str], claims: contextlib.ExitStack) -> list[str]:
    """The overrides Hydra runs with; a run folder this command writes is claimed (made, locked) in `claims`."""
    command_line = shlex.join(["metalearn", command, *args])
    args = migrate(args, note=True)
    _require_plugins(args)
    if command == "train":
        _register_study_sweeper()
    if command == "data":
        if not args or args[0] not in DATA_ACTIONS:
            raise MetalearnError(f"metalearn data needs an action: {' or '.join(DATA_ACTIONS)}.")
        return [f"action={args[0]}", *args[1:]]
    if command == "train":
        study = find_override(args, "hparams_search")
        if study is not None and not any(a.startswith("-") for a in args):
            raise MetalearnError(
                f"hparams_search={study} runs an Optuna study, a sweep: add -m "
                f"(metalearn train -m hparams_search={study} ...)."
            )
        run = find_override(args, "resume")
        if run is not None and is_export(run.strip("'\"")):
            raise MetalearnError(
                f"resume={run} is an exported file, which holds the weights alone: resume takes the run folder it "
                f"was exported from; `metalearn eval run={run}` scores the file."
            )
        if run is None:
            if any(a.startswith("-") for a in args):
                return args  # --help, --cfg, -m: Hydra's own; a sweep's runs are checked and locked in train_app
            return _claim_new_run(args, claims, command_line)
        folder = Path(run.strip("'\""))
        _writable(folder / "train.log", "resume the run")
        replayed = replay_run_overrides(run, args, drop=("resume",))
        if _main_process():  # before Hydra appends to the run's log
            lock_run(folder, command_line)
            claims.callback(release, folder)
        # Hydra must not rewrite the run's record before the resume is accepted: train() writes it then.
        return replayed + [f"resume={quoted(run)}", f"hydra.run.dir={quoted(run)}", "hydra.output_subdir=null"]
    run = find_override(args, "run")
    if run is None:
        if any(
            a in ("--help", "-h", "--hydra-help", "--info", "-i") or a.startswith("--cfg") or a == "-c" for a in args
        ):
            return args
        raise MetalearnError(f"{command} needs a run folder: metalearn {command} run=<run folder>.")
    if command == "export":
        saved_overrides(run.strip("'\""))  # the folder must be a run
        return args
    members = run_list(run)
    if len(members) == 1:
        run = members[0]
        replayed = replay_run_overrides(run, args, drop=("run", "resume")) + [f"run={quoted(run)}", *_eval_log(run)]
        return replayed + ([f"hydra.run.dir={quoted(str(record_folder(run)))}"] if is_export(run) else [])
    # An ensemble: each member's config is composed in evaluate(); its log goes to the first.
    for member in members:
        saved_overrides(member)  # each folder must be a run
    given = [a for a in args if override_key(a) != "run"]
    lead = quoted(str(record_folder(members[0])))
    return given + [f"run=[{','.join(quoted(m) for m in members)}]", f"hydra.run.dir={lead}"]


CONFIG_NAMES = {"train": "train", "eval": "eval", "export": "export", "data": "data"}
_DETAIL = (
    "full_key:",
    "reference_type=",
    "object_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
    "Config search path",
    "provider=",
)


def _one_paragraph(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and their causes) as one line, without the internals."""
    lines = []
    while err is not None:
        lines += [
            line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(_DETAIL)
        ]
        err = err.__cause__
    return " ".join(dict.fromkeys(lines)).rstrip(".") + "."


def _main_process() -> bool:
    """Rank 0 of a run on several processes (torchrun), or the one process: the one that writes the run folder."""
    from metalearn.distributed import from_environment

    return from_environment().main


def _check_overrides(command: str, args: list[str]) -> None:
    """Compose the config once before Hydra runs, so a bad override is a `metalearn: error:` paragraph.

    Sweeps, flags (--help, --cfg, -m) and plugin search paths are left to Hydra itself; a new run's
    overrides were composed already, to resolve its folder.
    """
    if any(a.startswith("-") for a in args) or find_override(args, "hydra.searchpath") is not None:
        return
    if command == "train" and find_override(args, "resume") is None:
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose(args, CONFIG_NAMES[command])
    except (HydraException, OmegaConfBaseException) as err:
        _fail(_one_paragraph(err))


# Where a process other than rank 0 logs: the console, warnings and errors only.
QUIET_RANK = (
    "hydra.output_subdir=null",
    "hydra.job_logging.handlers.file.filename=/dev/null",
    "hydra.job_logging.root.level=WARNING",
)


def _join_ranks(command: str, args: list[str]) -> list[str]:
    """Under torchrun (train, eval): join the process group; every rank runs in rank 0's run folder.

    Rank 0 resolves the run folder (its time stamp included) and gives it to the others, which write
    nothing there: no .hydra record, no log file.
    """
    if command not in ("train", "eval"):
        return args
    flags = any(a.startswith("-") for a in args)
    if flags and "WORLD_SIZE" not in os.environ:
        return args  # --help, --cfg, -m outside torchrun: answered without loading torch
    from metalearn import distributed

    if not distributed.from_environment().active:
        return args
    if flags:
        raise MetalearnError(
            "a run on several processes (torchrun) is one run: drop -m and other flags (--cfg, --help), "
            "or run them without torchrun."
        )
    from metalearn.device import resolve_device

    cfg = compose(args, CONFIG_NAMES[command], with_hydra=True)
    ranks = distributed.start(resolve_device(cfg.device.name), cfg.device.dist_timeout_s)
    run_dir = ranks.broadcast(str(Path(cfg.hydra.run.dir).absolute()) if ranks.main else None)
    replaced = {"hydra.run.dir", *([] if ranks.main else [override_key(q) for q in QUIET_RANK])}
    args = [a for a in args if override_key(a) not in replaced]
    return args + [f"hydra.run.dir={quoted(run_dir)}"] + ([] if ranks.main else list(QUIET_RANK))


def report_command(args: list[str]) -> None:
    """`metalearn report <folder> ... [out=<folder>] [--eval]` (no config to compose: plain arguments)."""
    from metalearn.report import find_runs, report

    out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), None)
    folders = [a for a in args if not a.startswith("out=") and a != "--eval"]
    if not folders:
        raise MetalearnError("report needs a folder: metalearn report <sweep or run folder> [...].")
    if "--eval" in args:  # the same test episodes for every run: eval's fixed eval.seed
        for run in find_runs(folders):
            if not run.evals and (run.folder / "checkpoints" / "best.pt").is_file():
                main(["eval", f"run={run.folder}"])
    report(folders, out)


def main(argv: list[str] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "report":
        try:
            return report_command(rest)
        except MetalearnError as err:
            _fail(str(err))
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; the commands are: {', '.join(COMMANDS)}.\n\n{USAGE}", code=2)
    # What is claimed for the command (a run folder made, its lock) is given back when it ends.
    with contextlib.ExitStack() as claims:
        _run(command, rest, claims)


def _run(command: str, rest: list[str], claims: contextlib.ExitStack) -> None:
    try:
        rest = _prepare(command, rest, claims)
    except MetalearnError as err:
        _fail(str(err))
    register_schemas()
    _check_overrides(command, rest)
    try:
        rest = _join_ranks(command, rest)
    except MetalearnError as err:
        _fail(str(err))
    sys.argv = [f"metalearn-{command}"] + rest
    try:
        COMMANDS[command]()
    except KeyboardInterrupt:
        _fail("interrupted.", code=130)


if __name__ == "__main__":
    main()
