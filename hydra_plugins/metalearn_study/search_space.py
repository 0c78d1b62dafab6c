"""A study's search space from Hydra's sweep syntax, as users know it from Hydra's Optuna plugin.

`hydra.sweeper.params` and the command line's overrides are parsed by Hydra's own override grammar:
  choice(a, b, c) or a,b,c   a categorical choice
  range(1, 5[, step])        whole numbers 1..4 (Hydra's range leaves out its end), or floats with a step
  interval(0.1, 1.0)         a float in [0.1, 1.0]; tag(log, interval(...)) on a log scale; tag(int, ...) whole
A plain value fixes its key; a key on the command line replaces the one of `params`.
"""

import math

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from metalearn.errors import MetalearnError


def search_space(params: dict, arguments: list[str]) -> tuple[dict, list[str]]:
    """({key: optuna distribution}, the fixed overrides), `arguments` winning over `params`."""
    parser = OverridesParser.create()
    given = [f"{key}={value}" for key, value in (params or {}).items()]
    by_key: dict[str, Override] = {}
    for override in parser.parse_overrides(given) + parser.parse_overrides(list(arguments)):
        by_key.pop(override.get_key_element(), None)  # the later one wins, in its own place
        by_key[override.get_key_element()] = override
    space, fixed = {}, []
    for key, override in by_key.items():
        if override.is_sweep_override() and not key.startswith("hydra"):
            space[key] = distribution(key, override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def distribution(key: str, override: Override):
    import optuna.distributions as d

    value = override.value()
    tags = value.tags
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution([_plain(v) for v in value.list])
    if isinstance(value, RangeSweep):
        points = list(value.range())
        if not points:
            raise MetalearnError(f"{override.input_line} holds no value: a range's start must lie before its end.")
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return d.IntDistribution(points[0], points[-1], step=abs(int(value.step)))
        return d.FloatDistribution(min(points), max(points), step=abs(float(value.step)))
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in tags
        if not low < high:
            raise MetalearnError(f"{override.input_line}: an interval's start must be below its end.")
        if log and low <= 0:
            raise MetalearnError(f"{override.input_line}: a log scale needs a start above 0.")
        if "int" in tags:
            return d.IntDistribution(math.ceil(low), math.floor(high), log=log)
        return d.FloatDistribution(float(low), float(high), log=log)
    raise MetalearnError(f"{override.input_line}: an Optuna study searches choice(), range() and interval() only.")


def _plain(element):
    """A choice's element as the override grammar parsed it (5 -> int, 0.1 -> float, maml -> str); anything
    else (a list, a dict) as its text."""
    return element if isinstance(element, (int, float, str, bool)) or element is None else str(element)


def grid(space: dict) -> dict:
    """The search space of Optuna's GridSampler: every key a list of values."""
    import optuna.distributions as d

    grid_space = {}
    for key, dist in space.items():
        if isinstance(dist, d.CategoricalDistribution):
            grid_space[key] = list(dist.choices)
        elif isinstance(dist, d.IntDistribution) and not dist.log:
            grid_space[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, d.FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step)
            grid_space[key] = [dist.low + i * dist.step for i in range(count + 1)]
        else:
            raise MetalearnError(
                f"the grid sampler needs a list of values for each key, and {key} searches an interval: "
                f"give it as choice(...) or range(...), or choose another sampler (hydra/sweeper/sampler=tpe)."
            )
    return grid_space


def as_override(key: str, value) -> str:
    """`key=value` that Hydra's grammar reads back as `value`."""
    if isinstance(value, str):
        return f"{key}={value}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"
