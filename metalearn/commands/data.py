"""`metalearn data info|preview [overrides]`: look at a dataset without training."""

import contextlib

import hydra
from omegaconf import DictConfig

from metalearn.commands.common import CONFIG_PATH, user_errors_exit
from metalearn.errors import MetalearnError

CONFIG_NAME = "data"
ACTIONS = ("info", "preview")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
@user_errors_exit
def app(cfg: DictConfig) -> None:
    from metalearn.data.overview import info, preview

    (info if cfg.action.value == "info" else preview)(cfg)


def prepare(args: list[str], claims: contextlib.ExitStack, command_line: str) -> list[str]:
    if not args or args[0] not in ACTIONS:
        raise MetalearnError(f"metalearn data needs an action: {' or '.join(ACTIONS)}.")
    return [f"action={args[0]}", *args[1:]]
