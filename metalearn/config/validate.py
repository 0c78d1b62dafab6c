"""Checking a composed config: every node against its schema, before anything runs."""

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from metalearn.config.settings import SettingError, checked, seed, settings_of
from metalearn.errors import MetalearnError
from metalearn.storage.checkpoint import checkpoint_name, top_count

COMPONENTS = ("algo", "data", "model")
RUN_NODES = ("task", "train", "eval", "device")
EXISTING_RUN = ("auto", "resume", "refuse")


@dataclass
class RunSeed:
    seed: int = 0

    def __post_init__(self):
        seed(self, "seed")


def validate(cfg: DictConfig) -> None:
    """Every node checked against its schema: range checks, and each component's own keys; errors name the key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise MetalearnError(f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no value (???): set it.")
    try:
        RunSeed(cfg.seed)
    except SettingError as err:
        raise MetalearnError(str(err)) from None
    for group in RUN_NODES:
        checked(cfg[group], group)
    if cfg.get("existing_run", "auto") not in EXISTING_RUN:
        raise MetalearnError(f"existing_run={cfg.existing_run} is none of {', '.join(EXISTING_RUN)}.")
    if "checkpoint" in cfg:  # metalearn eval: best, last or topN
        top_count(checkpoint_name(cfg))
    for group in COMPONENTS:
        settings_of(cfg[group], group)
