"""`metalearn <command> [Hydra overrides]`: the arguments, handled in one place, then the command's Hydra app.

Each command is a module of metalearn.commands: `prepare` turns its arguments into the overrides its
config is composed from (a resume or an evaluation replays the run's saved ones first), the config is
composed once here (a bad override is one error line), `claim` takes the run folder a new run writes,
and the command's Hydra app runs, so every Hydra flag works (`--help`, `--cfg job`, `-m`,
`hydra.run.dir=...`).
"""

import contextlib
import importlib
import shlex
import sys

from metalearn.commands import report
from metalearn.commands.common import composed, fail, has_flags, resolved_run_dir
from metalearn.commands.ranks import join_ranks, leave_ranks, refuse_flags, several_processes, under_torchrun
from metalearn.config.migrate import migrate
from metalearn.config.schema import register_schemas
from metalearn.errors import MetalearnError

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

COMMANDS = ("train", "eval", "export", "data")  # each a module of metalearn.commands with a Hydra app
ON_SEVERAL_PROCESSES = ("train", "eval")  # the commands torchrun runs as one run

# Hydra plugins behind a config choice (group, choice prefix), and their modules: the `sweep` extra.
PLUGINS = {
    ("hydra/launcher", "joblib"): "hydra_plugins.hydra_joblib_launcher",
    ("hydra/launcher", "submitit"): "hydra_plugins.hydra_submitit_launcher",
    ("hydra/sweeper", "optuna"): "optuna",
    ("hparams_search", ""): "optuna",  # every preset is an Optuna study
}


def require_plugins(args: list[str]) -> None:
    """A launcher or sweeper whose plugin is not installed: one line that names the extra to install."""
    for arg in args:
        group, _, choice = arg.lstrip("+~").partition("=")
        for (plugin_group, prefix), module in PLUGINS.items():
            if group != plugin_group or not choice.startswith(prefix):
                continue
            try:
                importlib.import_module(module)
            except ImportError:
                raise MetalearnError(f'{group}={choice} needs the sweep extra: pip install ".[sweep]".') from None


def hydra_overrides(command: str, args: list[str], claims: contextlib.ExitStack) -> list[str]:
    """The overrides the command's Hydra app runs with; a run folder it writes is claimed in `claims`."""
    module = command_module(command)
    command_line = shlex.join(["metalearn", command, *args])
    args = migrate(args, note=True)
    require_plugins(args)
    args = module.prepare(args, claims, command_line)
    several = command in ON_SEVERAL_PROCESSES and under_torchrun()
    if has_flags(args):
        if several and several_processes():
            refuse_flags()
        return args  # --help, --cfg, -m: Hydra's own; each run of a sweep is checked and locked in the app
    cfg = composed(args, module.CONFIG_NAME)
    if hasattr(module, "claim"):
        args = module.claim(cfg, args, claims, command_line)
    if several:
        args = join_ranks(args, cfg, resolved_run_dir(cfg))
    return args


def command_module(command: str):
    return importlib.import_module(f"metalearn.commands.{command}")


def run_command(command: str, args: list[str]) -> None:
    """One command to its end; what was claimed for it (a run folder made, its lock) is given back then."""
    with contextlib.ExitStack() as claims:
        try:
            args = hydra_overrides(command, args, claims)
        except MetalearnError as err:
            fail(str(err))
        register_schemas()
        sys.argv = [f"metalearn-{command}"] + args
        try:
            command_module(command).app()
        except KeyboardInterrupt:
            fail("interrupted.", code=130)
    try:
        leave_ranks()
    except MetalearnError as err:
        fail(str(err))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        with contextlib.suppress(BrokenPipeError):  # `metalearn --help | head` reads what it wants
            print(USAGE, flush=True)
        return
    command, rest = args[0], args[1:]
    if command == "report":
        try:
            return report.run(rest, run_command)
        except MetalearnError as err:
            fail(str(err))
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; the commands are: {', '.join(COMMANDS)}.\n\n{USAGE}", code=2)
    run_command(command, rest)


if __name__ == "__main__":
    main()
