"""Settings schemas: range checks that live with the keys they check, and typed components.

Every schema is a dataclass; its `__post_init__` refuses values out of range
with `SettingError(key, why)`, so the message names the key without the
schema knowing where in the config it sits (a nested schema's `check()` runs
from its parent's `__post_init__`, under `prefixed`). An algorithm, a dataset or a
backbone is a *component*: its YAML names its class with `_target_`
(Hydra's convention), and the class carries its schema as `Settings`.
`settings_of(node, group)` checks a composed node against that schema and
returns the filled-in dataclass.
"""

import inspect
import math
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from metalearn.errors import MetalearnError

SWITCHES = ("auto", "true", "false")  # the values of a setting that is on, off, or decided by the hardware


class SettingError(ValueError):
    """A value out of range; `key` is relative to the schema that refused it."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key} {why}")
        self.key, self.why = key, why

    def under(self, group: str) -> str:
        """The message with the key's full name; `why` may go on with the value (`=...`)."""
        return f"{group}.{self.key}{'' if self.why.startswith('=') else ' '}{self.why}"


@contextmanager
def prefixed(prefix: str):
    """Checks of a nested schema, run from its parent's __post_init__: their keys named from the parent."""
    try:
        yield
    except SettingError as err:
        raise SettingError(f"{prefix}.{err.key}", err.why) from None


def at_least(settings, key: str, low, optional: bool = False) -> None:
    value = getattr(settings, key)
    if value is None and optional:
        return
    if value is None or value < low:
        raise SettingError(key, f"must be at least {low}{' or null' if optional else ''} (got {value}).")


def positive(settings, key: str) -> None:
    """A finite number above 0 (inf and nan are refused too)."""
    value = getattr(settings, key)
    if not (value > 0 and math.isfinite(value)):
        raise SettingError(key, f"must be a finite number above 0 (got {value}).")


def finite(settings, key: str) -> None:
    value = getattr(settings, key)
    if not math.isfinite(value):
        raise SettingError(key, f"must be a finite number (got {value}).")


SEED_LIMIT = 2**63  # torch.manual_seed's range, from 0


def seed(settings, key: str) -> None:
    value = getattr(settings, key)
    if not 0 <= value < SEED_LIMIT:
        raise SettingError(key, f"must be in [0, 2**63) (got {value}).")


def within(settings, key: str, low, high) -> None:
    value = getattr(settings, key)
    if not low <= value <= high:  # nan fails this too
        raise SettingError(key, f"must be in [{low}, {high}] (got {value}).")


def checked(node: DictConfig, group: str, schema: type | None = None) -> Any:
    """The node as its schema's dataclass (typed already, or merged onto `schema`), every range check run.

    Errors name `group.key`.
    """
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node) if schema is not None else node
        return OmegaConf.to_object(typed)
    except SettingError as err:
        raise MetalearnError(err.under(group)) from None
    except ConfigKeyError as err:
        known = ", ".join(f.name for f in fields(schema) if not f.name.startswith("_")) if schema else ""
        raise MetalearnError(f"{group}.{err.key} is not a setting here; the settings are: {known}.") from None
    except MissingMandatoryValue as err:
        raise MetalearnError(f"{group}.{err.full_key} has no value (???): set it on the command line.") from None
    except ValidationError as err:
        message = str(err).splitlines()[0]
        raise MetalearnError(f"{group}.{err.full_key}: {message}.") from None


def component_class(node: DictConfig, group: str) -> type:
    """The class a component's YAML names with `_target_`."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise MetalearnError(f"{group} names no component: its YAML needs `_target_: <module>.<Class>`.")
    try:
        cls = get_class(target)
    except Exception as err:
        raise MetalearnError(f"{group}._target_={target} cannot be imported ({str(err).splitlines()[0]}).") from None
    if not is_dataclass(getattr(cls, "Settings", None)):
        raise MetalearnError(f"{group}._target_={target} has no `Settings` dataclass, so it is not a component.")
    return cls


def settings_of(node: DictConfig, group: str) -> Any:
    """A component's settings: the node checked against its class's `Settings` schema."""
    return checked(node, group, schema=component_class(node, group).Settings)


def plain(value: Any) -> Any:
    """Enum members as their values, for constructors that take plain strings."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def construct(cls: type, settings: Any, skip: tuple = ("_target_", "name"), **context: Any) -> Any:
    """`cls(**settings, **context)`: every setting by its own name, and the context keys the constructor takes.

    A setting the constructor does not take is a contract error of the component (a contract test checks it).
    """
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {}
    for f in fields(settings):
        if f.name in skip:
            continue
        if f.name not in parameters and not takes_any:
            raise TypeError(f"{cls.__name__} takes no argument {f.name!r}, a key of its Settings")
        kwargs[f.name] = plain(getattr(settings, f.name))
    kwargs.update({k: v for k, v in context.items() if k in parameters and k not in kwargs})
    return cls(**kwargs)
