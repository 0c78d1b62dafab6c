"""`metalearn export run=<run folder> [checkpoint=best] [out=<file>.safetensors|<folder>]`."""

import contextlib

import hydra
from omegaconf import DictConfig

from metalearn.commands.common import CONFIG_PATH, user_errors_exit
from metalearn.commands.eval import required_run
from metalearn.storage.run_folder import saved_overrides

CONFIG_NAME = "export"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
@user_errors_exit
def app(cfg: DictConfig) -> None:
    from metalearn.export.write import export

    export(cfg)


def prepare(args: list[str], claims: contextlib.ExitStack, command_line: str) -> list[str]:
    run = required_run(args, "export")
    if run is None:
        return args
    saved_overrides(run.strip("'\""))  # the folder must be a run
    return args
