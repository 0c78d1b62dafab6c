"""Write docs/configuration.md, the reference of every config key, from the settings schemas.

    python scripts/config_reference.py           # (re)write docs/configuration.md
    python scripts/config_reference.py --check   # exit 1 if it is not what this would write

Nothing here is written by hand: the keys and types are the fields of the schema
dataclasses (metalearn/config/schema.py for the run's own nodes, each component's
`Settings` for algo.*, data.* and model.*), the defaults are the values the
composed config gives (`metalearn.config.compose`), and the meanings are the
comments next to the fields in the schemas' source.
"""

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from metalearn.config.compose import compose
from metalearn.config.schema import DataAppConfig, EvalAppConfig, ExportAppConfig, TrainAppConfig
from metalearn.config.validate import COMPONENTS, RUN_NODES

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
OUT = REPO / "docs" / "configuration.md"
COMMAND = "python scripts/config_reference.py"
SKIPPED = {"_target_"}


# --- the comments next to a dataclass's fields ------------------------------------------------------------------


def _class_comments(cls: type) -> dict[str, str]:
    """name -> the comment of each field (or enum member) in `cls`'s own source.

    The trailing `# ...` of its line(s), else the comment lines just above it.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(token.start[0])
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        if trailing or above:
            found[name] = " ".join(trailing or above)
    return found


def field_comments(cls: type) -> dict[str, str]:
    """field -> comment, looked up in the class that declares the field (the class itself or a base)."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            merged.update(_class_comments(klass))
    return merged


def enum_comments(enum: type) -> dict[str, str]:
    """member value -> the comment after (or above) the member in the enum's source."""
    comments = _class_comments(enum)
    return {member.value: comments.get(member.name, "") for member in enum}


def class_summary(cls: type) -> str:
    """The schema's own docstring (not the signature dataclass() writes when there is none)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split())


# --- types and values --------------------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{' or '.join(type_name(a) for a in rest)} or null"
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, dict):
        return "mapping"
    if tp is Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " / ".join(f"`{m.value}`" for m in tp)
    if tp is str:
        return "string"
    return getattr(tp, "__name__", str(tp))


def shown(value: Any) -> str:
    """A value as the command line would take it, in code quotes."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif value == "???":
        return "required"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {shown(v).strip('`')}" for k, v in value.items()) + "}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(shown(v).strip("`") for v in value) + "]"
    else:
        text = str(value)
    return f"`{text}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def value_at(cfg: DictConfig, key: str, fallback: Any = MISSING) -> Any:
    """The composed value at a dotted key (unresolved, `???` for a mandatory one), else `fallback`."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return fallback
        node = node._get_node(part)
    if isinstance(node, (DictConfig, ListConfig)):
        return node
    return node._value()


# --- the rows of one schema --------------------------------------------------------------------------------------


class Row(typing.NamedTuple):
    key: str  # relative to the schema
    type: str
    meaning: str
    default: Any  # the schema's own default (MISSING where it has none)


def ordered_fields(schema: type) -> list:
    """The fields of the schema's own line of bases (its first base, that one's, ...) in order, then the others
    (mixins such as VectorizedSettings, which dataclass() puts first)."""
    chain, klass = [], schema
    while klass is not object:
        chain.append(klass)
        klass = klass.__bases__[0]
    own = {name for klass in chain for name in klass.__dict__.get("__annotations__", {})}
    every = fields(schema)
    return [f for f in every if f.name in own] + [f for f in every if f.name not in own]


def schema_rows(schema: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[Row]:
    """Every leaf of a schema as dotted keys, nested dataclasses expanded."""
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    rows = []
    for f in ordered_fields(schema):
        if f.name in SKIPPED or f.name in skip:
            continue
        tp = hints[f.name]
        if is_dataclass(tp):
            rows += schema_rows(tp, f"{prefix}{f.name}.")
            continue
        meaning = comments.get(f.name, "")
        if not meaning and isinstance(tp, type) and issubclass(tp, Enum):
            choices = enum_comments(tp)
            meaning = "; ".join(f"`{value}`: {why}" for value, why in choices.items() if why)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        rows.append(Row(prefix + f.name, type_name(tp), meaning, default))
    return rows


def table(rows: list[Row], group: str, columns: list[tuple[str, DictConfig]]) -> list[str]:
    """key | type | one default column per composed config | meaning."""
    heads = ["key", "type"] + [name for name, _ in columns] + ["meaning"]
    lines = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for row in rows:
        key = f"{group}.{row.key}" if group else row.key
        values = [shown(value_at(cfg, key, row.default)) for _, cfg in columns]
        lines.append("| " + " | ".join([f"`{key}`", cell(row.type)] + values + [cell(row.meaning)]) + " |")
    return lines


# --- the sections ------------------------------------------------------------------------------------------------


def yaml_chain(group: str, name: str) -> list[Path]:
    """A component YAML and the ones it inherits through `defaults:` (same group), base first."""
    path = CONF / group / f"{name}.yaml"
    chain = [path]
    for entry in OmegaConf.load(path).get("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_":
            chain = yaml_chain(group, entry) + chain
    return chain


def leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        return [key for k in node for key in leaves(node._get_node(k), f"{prefix}{k}.")]
    return [prefix[:-1]]


def run_keys_set_by(group: str, name: str) -> list[str]:
    """The keys outside its own group that a component's YAML files set (e.g. train.steps in an algo YAML)."""
    keys = []
    for path in yaml_chain(group, name):
        text = path.read_text()
        node = OmegaConf.load(path)
        if "@package _global_" not in text:
            continue
        for top in node:
            if top not in ("defaults", group):
                keys += [k for k in leaves(node._get_node(top), f"{top}.") if k not in keys]
    return sorted(keys, key=lambda k: (k.split(".")[0], k))


def run_sections() -> list[str]:
    train = compose([])
    schema_of = {f.name: f.type for f in fields(TrainAppConfig)}
    out = [
        "## The run: `task`, `train`, `eval`, `device` and top-level keys",
        "",
        f"Defaults as `metalearn train` composes them with the default algorithm (`algo={train.algo.name}`). "
        "Each algorithm's YAML sets its paper's `train.steps` and `train.meta_batch_size`, and some set "
        "`task.train.*`: see [Algorithms](#algorithms).",
    ]
    for group in RUN_NODES:
        schema = schema_of[group]
        out += ["", f"### `{group}`", ""]
        if class_summary(schema):
            out += [class_summary(schema), ""]
        out += table(schema_rows(schema), group, [("default", train)])
    out += ["", "### Top-level keys", ""]
    out += table(schema_rows(TrainAppConfig, skip=RUN_NODES + COMPONENTS), "", [("default", train)])
    shared = tuple(f.name for f in fields(TrainAppConfig))
    for command, schema, config_name in (("eval", EvalAppConfig, "eval"), ("data", DataAppConfig, "data")):
        out += ["", f"### Keys of `metalearn {command}` only", ""]
        out += table(schema_rows(schema, skip=shared), "", [("default", compose([], config_name=config_name))])
    out += ["", "### Keys of `metalearn export`", ""]
    out += table(schema_rows(ExportAppConfig), "", [("default", compose(["run=required"], config_name="export"))])
    return out


def component_sections(group: str, title: str, intro: str) -> list[str]:
    """One table per class; one default column per YAML of the group that names it."""
    default = compose([])[group]["name"]

    def place(name: str):
        """The default component first, then by the YAML each inherits from, a base before what builds on it."""
        root = yaml_chain(group, name)[0].stem
        return (root != default, root, len(yaml_chain(group, name)), name)

    by_class: dict[str, list[tuple[str, DictConfig]]] = {}
    for name in sorted((path.stem for path in (CONF / group).glob("*.yaml")), key=place):
        cfg = compose([f"{group}={name}"])
        by_class.setdefault(cfg[group]["_target_"], []).append((name, cfg))
    out = [f"## {title}", "", intro]
    for target, configs in by_class.items():
        cls = get_class(target)
        names = [name for name, _ in configs]
        out += ["", f"### {', '.join(f'`{group}={n}`' for n in names)}", ""]
        summary = class_summary(cls.Settings)
        out += [f"`{target}`{': ' + summary if summary else ''}", ""]
        columns = [(f"`{n}`" if len(configs) > 1 else "default", cfg) for n, cfg in configs]
        out += table(schema_rows(cls.Settings), group, columns)
        sets: dict[str, list[str]] = {}
        for name, cfg in configs:
            keys = run_keys_set_by(group, name)
            if keys:
                values = ", ".join(f"`{k}={shown(value_at(cfg, k)).strip('`')}`" for k in keys)
                sets.setdefault(values, []).append(name)
        for values, names in sets.items():
            who = f"`{group}={names[0]}`" if len(names) == 1 else f"Each of {', '.join(f'`{n}`' for n in names)}"
            out += ["", f"{who} also sets {values}."]
    return out


def render() -> str:
    lines = [
        "<!-- Generated by `python scripts/config_reference.py` from the settings schemas. Do not edit by hand. -->",
        "",
        "# Configuration reference",
        "",
        f"Every key of `metalearn train`, `eval` and `data`. This file is generated by `{COMMAND}` from the "
        "schemas (the dataclasses of `metalearn/config/schema.py` and each component's `Settings` class) and the YAML "
        f"files in `conf/`; do not edit it by hand: change the schema or the YAML, then run `{COMMAND}` "
        "(the tests check that it is current).",
        "",
        "Set a key on the command line as `key=value` (`metalearn train task.shots=5 train.steps=2000`). "
        "A misspelled key, a value of the wrong type or one out of range stops the command before anything "
        "runs, with an error that names the key. `metalearn train --help` prints the groups and the composed "
        "config; `metalearn train algo=<name> --cfg job` prints one algorithm's.",
        "",
        "Defaults are the values the composed config gives; `required` marks a key without one.",
        "",
    ]
    lines += run_sections()
    lines += [""] + component_sections(
        "algo",
        "Algorithms",
        "`algo=<name>` picks a YAML in `conf/algo/`; its `_target_` names the class, whose `Settings` schema "
        "lists the keys. YAMLs of one class (the MAML family) share a table, one default column each.",
    )
    lines += [""] + component_sections(
        "data", "Datasets", "`data=<name>` picks a YAML in `conf/data/`; `data.root` is where its files are."
    )
    lines += [""] + component_sections("model", "Backbones", "`model=<name>` picks a YAML in `conf/model/`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {OUT.relative_to(REPO)} is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run `{COMMAND}`.", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(REPO)} is current.")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
