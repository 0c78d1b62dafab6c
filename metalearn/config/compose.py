"""Composing a command's config from metalearn.conf and overrides, as Hydra does for the command itself."""

from collections.abc import Sequence

from omegaconf import DictConfig

from metalearn.config.schema import register_schemas


def compose(overrides: Sequence[str] = (), config_name: str = "train", with_hydra: bool = False) -> DictConfig:
    """The config `metalearn train <overrides>` runs with (for scripts and tests); old keys work here too.

    with_hydra: the `hydra` node too (its run folder, with the time of this call)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from metalearn.config.migrate import migrate

    register_schemas()
    with initialize_config_module(config_module="metalearn.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=migrate(list(overrides)), return_hydra_config=with_hydra)
