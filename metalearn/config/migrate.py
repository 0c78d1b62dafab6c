"""Keys that were renamed, and the overrides that still use them.

Run folders keep the overrides they were started with (.hydra/overrides.yaml);
`resume=` and `eval run=` replay them through `migrate`, so runs made before
a rename still resume and evaluate. On the command line an old key works too,
with a note that names the new one.
"""

import re
import sys
from importlib import resources

# old key (or key prefix ending in ".") -> new key
RENAMED = {
    "data.ways": "task.ways",
    "data.shots": "task.shots",
    "data.queries": "task.queries",
    "algo.train_ways": "task.train.ways",
    "algo.train_shots": "task.train.shots",
    "algo.train_queries": "task.train.queries",
    "data.replay.": "train.replay.",
}
# Reptile's interpolation step had the name of the other algorithms' Adam rate.
RENAMED_FOR = {
    "reptile": {"algo.outer_lr": "algo.meta_step", "algo.outer_lr_final": "algo.meta_step_final"},
}

_OVERRIDE = re.compile(r"^(?P<prefix>[+~]*)(?P<key>[\w.]+)(?P<rest>(@[\w.]*)?=.*)?$", re.S)


def _value_of(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+~") == key and "=" in a]
    return values[-1].strip("'\"") if values else None


def algorithm_of(args: list[str]) -> str:
    """The algorithm a list of overrides selects: algo=..., else the one its experiment preset names."""
    algo = _value_of(args, "algo")
    if algo:
        return algo
    preset = _value_of(args, "experiment")
    if preset:
        try:
            text = (resources.files("metalearn.conf") / "experiment" / f"{preset}.yaml").read_text()
        except (FileNotFoundError, OSError):
            return ""
        found = re.search(r"override /algo:\s*(\w+)", text)
        return found.group(1) if found else ""
    return "maml"


def new_key(key: str, algorithm: str) -> str | None:
    renamed = {**RENAMED, **RENAMED_FOR.get(algorithm, {})}
    if key in renamed:
        return renamed[key]
    for old, new in renamed.items():
        if old.endswith(".") and key.startswith(old):
            return new + key[len(old) :]
    return None


def migrate(args: list[str], note: bool = False) -> list[str]:
    """`args` with every renamed key under its new name; `note` prints what changed (to stderr)."""
    algorithm = algorithm_of(args)
    out = []
    for arg in args:
        match = _OVERRIDE.match(arg)
        renamed = new_key(match.group("key"), algorithm) if match and not arg.startswith("-") else None
        if renamed is None:
            out.append(arg)
            continue
        if note:
            print(f"metalearn: note: {match.group('key')} is now {renamed}", file=sys.stderr)
        out.append(f"{match.group('prefix')}{renamed}{match.group('rest') or ''}")
    return out
