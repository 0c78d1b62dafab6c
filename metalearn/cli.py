"""`metalearn <command> [Hydra overrides]`: dispatch to one Hydra app per command.

`train` and `eval` are ordinary Hydra apps, so every Hydra flag works
(`--help`, `--cfg job`, `-m`, `hydra.run.dir=...`). `resume=<run>` and
`eval run=<run>` replay the run's saved overrides (.hydra/overrides.yaml)
before the new ones, so the run's own config is composed again and any
override given now still applies.
"""

import functools
import sys
from pathlib import Path
from typing import Callable, Dict, List

import hydra
from omegaconf import DictConfig, OmegaConf

from metalearn.checkpoint import refuse_existing_run
from metalearn.config import register_schemas
from metalearn.errors import MetalearnError

CONFIG_PATH = "pkg://metalearn.conf"
USAGE = """usage: metalearn <command> [overrides ...]

commands:
  train   meta-train a model; each run gets its own folder under runs/
          e.g. metalearn train algo=maml data.root=/data
               metalearn train -m algo=maml,fomaml seed=0,1,2
               metalearn train resume=<run folder> [train.steps=...]
  eval    evaluate a run's checkpoint on test-split episodes (accuracy ± 95% CI)
          e.g. metalearn eval run=<run folder> [checkpoint=best|last] [eval.episodes=600]
               metalearn eval 'run=[<run>,<run>,<run>]'   (an ensemble, next to each member)
               metalearn eval run=<omniglot run> data=mnist     (cross-domain)
  data    look at a dataset: `data info` (classes and images per split, cache)
          or `data preview` (a PNG of one sampled episode)
          e.g. metalearn data info data=mnist data.root=/data
               metalearn data preview data=omniglot data.ways=5 data.shots=1 [part=val] [out=x.png]

`metalearn <command> --help` lists the config groups and keys of a command;
`metalearn <command> --cfg job [overrides]` prints the composed config.
"""


def _fail(message: str, code: int = 1) -> None:
    print(f"metalearn: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _user_errors_exit(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """A MetalearnError ends the command with its message, not a traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        try:
            return task(cfg)
        except MetalearnError as err:
            _fail(str(err))

    return wrapper


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@_user_errors_exit
def train_app(cfg: DictConfig) -> None:
    from metalearn.train import train

    train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@_user_errors_exit
def eval_app(cfg: DictConfig) -> None:
    from metalearn.evaluate import evaluate

    evaluate(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="inspect")
@_user_errors_exit
def data_app(cfg: DictConfig) -> None:
    from metalearn.inspect_data import run

    run(cfg)


COMMANDS = {"train": train_app, "eval": eval_app, "data": data_app}
DATA_ACTIONS = ("info", "preview")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _find(args: List[str], key: str):
    values = [a.split("=", 1)[1] for a in args if "=" in a and _override_key(a) == key]
    return values[-1] if values else None


# Keys that mean the same for every dataset; the others (data.split,
# data.classes) belong to one dataset and are not carried to another.
PORTABLE_DATA_KEYS = ("data.root", "data.cache_dir", "data.ways", "data.shots", "data.queries")


def saved_overrides(run_dir: str) -> List[str]:
    """The overrides a run was started with, or an error if the folder is not a run."""
    folder = Path(run_dir)
    saved_path = folder / ".hydra" / "overrides.yaml"
    if not folder.is_dir():
        raise MetalearnError(f"run folder {folder} does not exist.")
    if not saved_path.is_file():
        raise MetalearnError(
            f"{folder} is not a metalearn run folder: it has no .hydra/overrides.yaml "
            f"(give the folder that `metalearn train` printed at the end)."
        )
    return list(OmegaConf.load(saved_path))


def replay_run_overrides(run_dir: str, args: List[str], drop: tuple) -> List[str]:
    """The run's saved task overrides, then `args`; a key given in `args` wins.

    Switching dataset (`data=mnist` on an Omniglot run) keeps the run's task
    shape and data folders but not its dataset-specific keys.
    """
    saved = saved_overrides(run_dir)
    if _find(args, "data") is not None:
        saved = [o for o in saved if not _override_key(o).startswith("data.") or _override_key(o) in PORTABLE_DATA_KEYS]
    merged: Dict[str, str] = {}
    for override in saved + [a for a in args if "=" in a and not a.startswith("-")]:
        key = _override_key(override)
        if key not in drop and not key.startswith("hydra."):
            merged.pop(key, None)
            merged[key] = override
    flags = [a for a in args if "=" not in a or a.startswith("-")]
    hydra_args = [a for a in args if "=" in a and _override_key(a).startswith("hydra.")]
    return flags + list(merged.values()) + hydra_args


def _prepare(command: str, args: List[str]) -> List[str]:
    if command == "data":
        if not args or args[0] not in DATA_ACTIONS:
            raise MetalearnError(f"metalearn data needs an action: {' or '.join(DATA_ACTIONS)}.")
        return [f"action={args[0]}", *args[1:]]
    if command == "train":
        run = _find(args, "resume")
        if run is None:
            run_dir = _find(args, "hydra.run.dir")
            if run_dir is not None:  # checked before Hydra rewrites <run>/.hydra
                refuse_existing_run(Path(run_dir.strip("'\"")))
            return args
        replayed = replay_run_overrides(run, args, drop=("resume",))
        return replayed + [f"resume={quoted(run)}", f"hydra.run.dir={quoted(run)}"]
    run = _find(args, "run")
    if run is None:
        if any(
            a in ("--help", "-h", "--hydra-help", "--info", "-i") or a.startswith("--cfg") or a == "-c" for a in args
        ):
            return args
        raise MetalearnError("eval needs a run folder: metalearn eval run=<run folder>.")
    members = run_list(run)
    if len(members) == 1:
        run = members[0]
        return replay_run_overrides(run, args, drop=("run", "resume")) + [f"run={quoted(run)}"]
    # An ensemble: each member's config is composed in evaluate(); its log goes to the first.
    for member in members:
        saved_overrides(member)  # each folder must be a run
    given = [a for a in args if _override_key(a) != "run"]
    return given + [f"run=[{','.join(quoted(m) for m in members)}]", f"hydra.run.dir={quoted(members[0])}"]


def run_list(value: str) -> List[str]:
    """`run=<folder>` or `run=[<folder>,<folder>,...]` as a list of folders."""
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]")):
        return [value.strip("'\"")]
    members = [m.strip().strip("'\"") for m in value[1:-1].split(",") if m.strip()]
    if not members:
        raise MetalearnError("run=[] names no run folder: give one folder, or several as run=[a,b,c].")
    return members


def main(argv: List[str] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; the commands are: {', '.join(COMMANDS)}.\n\n{USAGE}", code=2)
    try:
        rest = _prepare(command, rest)
    except MetalearnError as err:
        _fail(str(err))
    register_schemas()
    sys.argv = [f"metalearn-{command}"] + rest
    try:
        COMMANDS[command]()
    except KeyboardInterrupt:
        _fail("interrupted.", code=130)


if __name__ == "__main__":
    main()
