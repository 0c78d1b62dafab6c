"""README.md, checked: a short manual whose commands compose, whose links and named paths exist.

Each `metalearn` command of a ```bash block is composed with the overrides it
gives (a sweep once per value of each swept key), as the command itself would
before it runs, so a misspelled key, choice or a value out of range fails here.
Nothing is trained: the whole file takes seconds.
"""

import re
import shlex

import pytest
from helpers.data import REPO, SHARED_DATA
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import HydraException

from metalearn.config.compose import compose
from metalearn.config.validate import validate
from metalearn.errors import MetalearnError

README = REPO / "README.md"
# The pages whose links are checked: the README and the manual's pages it leads to.
PAGES = [README] + [
    REPO / "docs" / f"{name}.md" for name in ("runs", "scaling", "data", "algorithms", "extending", "layout")
]
MAX_LINES = 200
COMMANDS = ("train", "eval", "export", "report", "data")
FLAGS_WITH_A_VALUE = ("--cfg", "-c", "--package", "-p")  # Hydra flags that take the next word
# Where a path the README names must be: the repository's own files (run folders and outputs are not).
REPO_PATH = re.compile(r"^(?:conf|docs|metalearn|scripts|tests|hydra_plugins|\.ci)/[\w./-]*$|^[\w-]+\.(?:toml|md)$")


def bash_commands(text: str) -> list[str]:
    """Every `metalearn ...` command line of the ```bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "metalearn":
                lines.append(shlex.join(words))
    return lines


def values(override) -> list[str]:
    """`algo=protonet,fomaml` -> [`algo=protonet`, `algo=fomaml`]; `seed=range(0,3)` -> [`seed=0`].

    `_get_value_element_as_str` writes a value back as an override's text (`null`, quoted strings)."""
    if not override.is_sweep_override():
        return [override.input_line]
    sweep = override.value()
    chosen = sweep.list if isinstance(sweep, ChoiceSweep) else [sweep.start]
    return [f"{override.get_key_element()}={override._get_value_element_as_str(value)}" for value in chosen]


def sweep_runs(overrides: list[str]) -> list[list[str]]:
    """The sweep's first run, and one run for each other value of a swept key (not every combination)."""
    choices = [values(o) for o in OverridesParser.create().parse_overrides(overrides)]
    first = [options[0] for options in choices]
    return [first] + [
        first[:i] + [other] + first[i + 1 :] for i, options in enumerate(choices) for other in options[1:]
    ]


def composed(command_line: str) -> list:
    """The configs the command would run with; raises as the command would on a misspelled key or bad value."""
    words = shlex.split(command_line)[1:]
    if not words or words[0] not in COMMANDS:
        return []  # `metalearn --help`
    command, rest = words[0], words[1:]
    if command == "report":
        return []  # takes folders, not overrides
    if command == "data":
        rest = [f"action={rest[0]}", *rest[1:]]
    overrides, skip = [], False
    for word in rest:
        if skip or word.startswith("-"):
            skip = not skip and word in FLAGS_WITH_A_VALUE
            continue
        overrides.append(word)
    configs = [compose(run, config_name=command) for run in sweep_runs(overrides)]
    if command != "export":
        for cfg in configs:
            validate(cfg)
    return configs


README_COMMANDS = bash_commands(README.read_text())


def test_the_readme_is_a_short_manual_with_commands():
    assert len(README.read_text().splitlines()) <= MAX_LINES
    assert {shlex.split(c)[1] for c in README_COMMANDS} >= set(COMMANDS)


@pytest.mark.parametrize("command_line", README_COMMANDS)
def test_each_readme_command_composes(command_line):
    composed(command_line)


@pytest.mark.parametrize(
    ("command_line", "named"),
    [
        ("metalearn train algo=protonet train.stepz=200", "train.stepz"),
        ("metalearn train -m algo=protonet,fomaml sead=0,1", "sead"),
        ("metalearn train -m algo=protonet,fomamll seed=0,1", "fomamll"),
        ("metalearn eval run=runs/first eval.episode=1000", "eval.episode"),
        ("metalearn data preview task.way=5", "task.way"),
        ("metalearn export run=runs/first outt=x.safetensors", "outt"),
        ("metalearn train algo=protonet train.steps=0", "train.steps"),
        ("metalearn train algo=protonett", "protonett"),
    ],
)
def test_a_misspelled_key_or_a_bad_value_fails_the_check(command_line, named):
    with pytest.raises((HydraException, MetalearnError), match=re.escape(named)):
        composed(command_line)


def test_a_sweep_is_checked_by_each_value_of_each_swept_key():
    configs = composed("metalearn train -m algo=fomaml,protonet seed=2,3,4 train.steps=5")
    assert [(c.algo.name, c.seed, c.train.steps) for c in configs] == [
        ("fomaml", 2, 5),
        ("protonet", 2, 5),
        ("fomaml", 3, 5),
        ("fomaml", 4, 5),
    ]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_every_path_the_readme_names_exists():
    spans = re.findall(r"`([^`\n]+)`", README.read_text())
    named = [s for s in spans if REPO_PATH.match(s)]
    assert "conf/train.yaml" in named, "the pattern finds the paths it should"
    assert [p for p in named if not (REPO / p).exists()] == []


def test_the_readme_data_root_is_the_shared_data():
    roots = {w.split("=", 1)[1] for c in README_COMMANDS for w in shlex.split(c) if w.startswith("data.root=")}
    assert roots == {"../shared/data"}
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the datasets are not at {SHARED_DATA}")
    assert (SHARED_DATA / "omniglot-py").is_dir() and (SHARED_DATA / "MNIST" / "raw").is_dir()


def test_the_test_command_is_the_one_ci_runs():
    assert re.search(r'^pip install "\.\[dev\]" && pytest$', README.read_text(), re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r'^pip install "\.\[dev\]"$', ci, re.M) and re.search(r"^pytest$", ci, re.M)


def tables(text: str) -> list[list[str]]:
    """Each Markdown table: its consecutive `|` lines, the separator row left out."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current += [] if re.fullmatch(r"\|( ?:?-+:? ?\|)+", line) else [line]
        elif current:
            found, current = found + [current], []
    return found


def cells(row: str) -> int:
    """The cells a row renders as: every unescaped `|` splits, inside code spans too."""
    return len(re.split(r"(?<!\\)\|", row.strip()[1:-1]))


def test_every_table_row_has_as_many_cells_as_its_header():
    uneven = [row for table in tables(README.read_text()) for row in table[1:] if cells(row) != cells(table[0])]
    assert not uneven


def test_every_algorithm_dataset_and_backbone_has_a_row():
    rows = "\n".join(line for line in README.read_text().splitlines() if line.startswith("| `"))
    for group in ("algo", "data", "model"):
        for yaml in (REPO / "conf" / group).glob("*.yaml"):
            assert f"| `{yaml.stem}`" in rows, f"{group}={yaml.stem} has no row in the README's tables"
