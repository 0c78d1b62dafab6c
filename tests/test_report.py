"""`metalearn report` on a generated sweep: every figure equals the one computed by hand from the files."""

import csv
import json
import math
import statistics
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metalearn.report import DPI, FIGURE_SIZE, PLOTS

pytest.importorskip("matplotlib", reason="the report extra: pip install '.[report]'")


def write_run(folder, overrides, steps, val, train_loss, tests):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "config.yaml").write_text(f"train:\n  steps: {steps}\n")
    lines = [{"step": s, "split": "train", "loss": v, "tasks_per_s": 10.0, "time": 2.0 * s} for s, v in train_loss]
    lines += [{"step": s, "split": "val", "loss": 1.0, "accuracy": a, "ci95": 0.1} for s, a in val]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(lines, key=lambda r: r["step"])))
    if tests:
        (folder / "evals.jsonl").write_text("".join(json.dumps({"accuracy": a, "ci95": c}) + "\n" for a, c in tests))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    common = ["train.steps=4", "data.root=/somewhere"]
    write_run(
        root / "0",
        ["algo=maml", "seed=0", *common],
        4,
        [(2, 0.5), (4, 0.7)],
        [(2, 1.0), (4, 0.8)],
        [(0.6, 0.02), (0.65, 0.02)],
    )
    write_run(
        root / "1", ["algo=maml", "seed=1", *common], 4, [(2, 0.8), (4, 0.6)], [(2, 1.2), (4, 0.6)], [(0.75, 0.03)]
    )
    write_run(
        root / "2", ["algo=protonet", "seed=0", *common], 4, [(2, 0.9), (4, 0.9)], [(2, 0.3), (4, 0.2)], [(0.9, 0.01)]
    )
    write_run(root / "3", ["algo=protonet", "seed=1", *common], 4, [(2, 0.85)], [(2, 0.4)], [])  # stopped, no test
    return root


def interval(values):
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def test_the_report_table_and_files_hold_the_figures_computed_by_hand(cli, sweep):
    out = cli("report", str(sweep)).stdout
    with open(sweep / "report.csv") as handle:
        rows = {row["group"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"algo=maml", "algo=protonet"} and "every run: train.steps=4" in out
    maml, protonet = rows["algo=maml"], rows["algo=protonet"]
    # best validation per run 0.7 and 0.8; the latest test per run 0.65 and 0.75
    assert float(maml["best_val"]) == pytest.approx(0.75) and float(maml["best_val_ci95"]) == pytest.approx(
        interval([0.7, 0.8])
    )
    assert float(maml["test"]) == pytest.approx(0.70) and float(maml["test_ci95"]) == pytest.approx(
        interval([0.65, 0.75])
    )
    assert maml["runs"] == "2" and maml["steps"] == "4" and maml["status"] == "done"
    assert float(protonet["best_val"]) == pytest.approx((0.9 + 0.85) / 2) and protonet["tested"] == "1"
    assert protonet["steps"] == "2/4" and "stopped or running at step 2" in protonet["status"]
    assert "75.00 ± 9.80" in out and "90.00 ± 0.00 (1 of 2)" in out  # as printed
    assert "| algo=maml | 2 | 4 | 75.00 ± 9.80 |" in (sweep / "report.md").read_text()
    for name in PLOTS:
        with Image.open(sweep / name) as image:
            assert image.format == "PNG" and image.size == (FIGURE_SIZE[0] * DPI, FIGURE_SIZE[1] * DPI)


def test_a_folder_without_runs_is_one_line_error(cli, tmp_path):
    result = cli("report", str(tmp_path), check=False)
    assert result.returncode == 1 and result.stderr.strip().startswith("metalearn: error: no runs under")


def test_a_run_whose_log_ends_on_an_error_is_marked_failed_until_it_is_resumed(cli, sweep):
    log = sweep / "3" / "train.log"
    log.write_text(
        "[2026-01-01 00:00:00,000][metalearn.train][INFO] - run folder x\n"
        "[2026-01-01 00:00:01,000][metalearn][ERROR] - training diverged at step 3: the training loss is nan.\n"
    )
    cli("report", str(sweep))
    with open(sweep / "report.csv") as handle:
        assert {r["group"]: r for r in csv.DictReader(handle)}["algo=protonet"]["status"] == (
            "done, failed: training diverged at step 3"
        )
    with log.open("a") as handle:
        handle.write("[2026-01-01 00:01:00,000][metalearn.train][INFO] - resuming x from step 2\n")
    cli("report", str(sweep))
    with open(sweep / "report.csv") as handle:
        assert (
            "stopped or running at step 2" in {r["group"]: r for r in csv.DictReader(handle)}["algo=protonet"]["status"]
        )


def test_sampled_floats_read_short_unless_two_groups_would_then_read_the_same(cli, tmp_path):
    for name, lr in (("a", "0.0012520653814999472"), ("b", "0.0007501954443620128"), ("c", "1e+30")):
        write_run(tmp_path / "s" / name, [f"algo.outer_lr={lr}", "task.train.ways=60"], 4, [(4, 0.5)], [(4, 1.0)], [])
    cli("report", str(tmp_path / "s"))
    with open(tmp_path / "s" / "report.csv") as handle:
        groups = {row["group"] for row in csv.DictReader(handle)}
    assert groups == {"algo.outer_lr=0.001252", "algo.outer_lr=0.0007502", "algo.outer_lr=1e+30"}

    # 0.00125206538 and 0.00125206539 both read 0.001252: every digit is kept
    for name, lr in (("a", "0.00125206538"), ("b", "0.00125206539")):
        write_run(tmp_path / "t" / name, [f"algo.outer_lr={lr}", "task.train.ways=60"], 4, [(4, 0.5)], [(4, 1.0)], [])
    cli("report", str(tmp_path / "t"))
    with open(tmp_path / "t" / "report.csv") as handle:
        groups = {row["group"] for row in csv.DictReader(handle)}
    assert groups == {"algo.outer_lr=0.00125206538", "algo.outer_lr=0.00125206539"}


NOT_RECORDS = [
    "null",
    "3",
    "[1, 2]",
    '"val"',
    '{"split": "val", "accuracy": 0.99}',  # no step
    '{"step": 4, "accuracy": 0.99}',  # no split
    '{"step": 4, "split": "val", "accuracy": "0.99"}',
    '{"step": true, "split": "val", "accuracy": 0.99}',
    '{"step": 4, "split": "val", "accuracy": true}',
    '{"step": 4, "split": "val", "accuracy": NaN}',
    '{"step": 4, "split": "val", "accuracy": Infinity}',
    '{"step": 4, "split": "val", "accuracy": 1e308}',  # finite, but 100 times it (a percentage) is not
    "1" * 5000,  # more digits than Python reads
    "[" * 100000,  # deeper than Python reads
    '{"step": 4, "split": "train", "loss": 0.1, "tim',  # cut short by a crash
]
NOT_RESULTS = [
    "null",
    '{"accuracy": "0.99", "ci95": 0.01}',
    '{"ci95": 0.01}',
    '{"accuracy": 0.99}',
    "[0.99, 0.01]",
    '{"accuracy": 0.99, "ci',
]


def append_lines(path, lines):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(f"{line}\n" for line in lines))


def test_lines_that_are_no_records_are_skipped_with_one_note_per_file(cli, sweep):
    append_lines(sweep / "0" / "metrics.jsonl", NOT_RECORDS)
    append_lines(sweep / "1" / "evals.jsonl", NOT_RESULTS)
    result = cli("report", str(sweep))
    assert result.stderr.splitlines() == [
        f"metalearn: note: skipped {len(NOT_RECORDS)} lines that are no metric records in "
        f"{sweep / '0' / 'metrics.jsonl'} (line 5: null, not an object, ...); the report goes on without them.",
        f"metalearn: note: skipped {len(NOT_RESULTS)} lines that are no evaluation results in "
        f"{sweep / '1' / 'evals.jsonl'} (line 2: null, not an object, ...); the report goes on without them.",
    ]
    with open(sweep / "report.csv") as handle:
        maml = {row["group"]: row for row in csv.DictReader(handle)}["algo=maml"]
    # the figures of the valid lines alone, as in the report of the undamaged sweep
    assert float(maml["best_val"]) == pytest.approx(0.75) and float(maml["test"]) == pytest.approx(0.70)
    assert maml["steps"] == "4" and maml["status"] == "done"


def test_a_note_names_the_one_line_it_skipped_and_why(cli, sweep):
    append_lines(sweep / "3" / "metrics.jsonl", ['{"step": 4, "split": "val", "accuracy": [0.9]}'])
    result = cli("report", str(sweep))
    assert result.stderr == (
        f"metalearn: note: skipped 1 line that is no metric record in {sweep / '3' / 'metrics.jsonl'} "
        f"(line 3: accuracy is not a number); the report goes on without it.\n"
    )


# Property-based: whatever the lines of metrics.jsonl or evals.jsonl are, `report` reads the rest of the runs and
# notes what it skipped, never a traceback. Without plots (matplotlib takes a second a report): the numbers a
# plot could get are those of the lines the report keeps, which the example tests above plot.
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
NUMBERS = st.floats(0, 1) | st.integers(-3, 10) | st.floats(allow_nan=True, allow_infinity=True)
RECORD_LIKE = st.fixed_dictionaries(  # the fields the report reads, each maybe missing, maybe of any value
    {},
    optional={
        "step": st.integers(-3, 10) | SCALARS,
        "split": st.sampled_from(["train", "val"]) | SCALARS,
        **{key: NUMBERS | JSON_VALUES for key in ("loss", "accuracy", "ci95", "tasks_per_s", "time")},
    },
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # any text UTF-8 can hold
LINES = st.lists(
    st.one_of(
        JSON_VALUES.map(json.dumps),
        RECORD_LIKE.map(json.dumps),
        st.tuples(RECORD_LIKE.map(json.dumps), st.integers(0, 30)).map(lambda cut: cut[0][: cut[1]]),  # cut short
        TEXT,
    ),
    min_size=1,
    max_size=5,
)
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every machine
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_reported_with_notes_only(result):
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert all(line.startswith("metalearn: note: skipped ") for line in result.stderr.splitlines()), result.stderr


@FUZZ
@given(lines=LINES, at=st.integers(0, 4))
def test_any_lines_in_metrics_jsonl_are_reported_or_skipped_with_a_note(cli, tmp_path_factory, lines, at):
    root = tmp_path_factory.mktemp("fuzz")
    for seed in (0, 1):  # a group of two runs: the report takes means and intervals across them
        write_run(root / str(seed), ["algo=maml", f"seed={seed}"], 4, [(2, 0.5), (4, 0.7)], [(4, 0.8)], [(0.6, 0.02)])
    path = root / "0" / "metrics.jsonl"
    kept = path.read_text().splitlines()
    path.write_text("\n".join(kept[:at] + lines + kept[at:]) + "\n", encoding="utf-8")
    with mock.patch("metalearn.report.plots", return_value=[]):
        assert_reported_with_notes_only(cli("report", str(root)))


@FUZZ
@given(lines=LINES)
def test_any_lines_in_evals_jsonl_are_reported_or_skipped_with_a_note(cli, tmp_path_factory, lines):
    root = tmp_path_factory.mktemp("fuzz")
    for seed in (0, 1):
        write_run(root / str(seed), ["algo=maml", f"seed={seed}"], 4, [(4, 0.7)], [(4, 0.8)], [(0.6, 0.02)])
    append_lines(root / "0" / "evals.jsonl", lines)
    with mock.patch("metalearn.report.plots", return_value=[]):
        assert_reported_with_notes_only(cli("report", str(root)))


def test_overrides_with_interpolations_are_settings_as_written_and_a_damaged_record_is_skipped(cli, sweep):
    """A run started with `task.train.ways=${task.ways}` is grouped by that text; a record that is no YAML list
    is skipped with a note, and the report of the other runs goes on."""
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("- algo=maml\n- seed=1\n- task.train.ways=${task.ways}\n")
    (sweep / "3" / ".hydra" / "overrides.yaml").write_text("- algo=protonet\n  : [unclosed\n")
    result = cli("report", str(sweep))
    with open(sweep / "report.csv") as handle:
        groups = {row["group"] for row in csv.DictReader(handle)}
    assert any("task.train.ways=${task.ways}" in group for group in groups), groups
    assert "Traceback" not in result.stderr
    assert f"skipped {sweep / '3'}" in result.stderr


def test_out_naming_a_file_is_one_error_line(cli, sweep):
    result = cli("report", str(sweep), f"out={sweep / '0' / 'metrics.jsonl'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is a file: the report writes a table and plots into a folder" in result.stderr


def test_report_help_is_its_usage_and_writes_nothing(cli, tmp_path):
    result = cli("report", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: metalearn report <folder>")
    assert not list(tmp_path.iterdir())


def test_report_eval_scores_just_the_runs_with_a_best_checkpoint_and_no_test_result(sweep, tmp_path):
    from metalearn.commands.report import run

    for name in ("1", "3"):  # run 1 has a test result; run 3 has none
        (sweep / name / "checkpoints").mkdir()
        (sweep / name / "checkpoints" / "best.pt").write_bytes(b"")
    scored = []
    run([str(sweep), "--eval", f"out={tmp_path / 'out'}"], lambda command, args: scored.append((command, args)))
    assert scored == [("eval", [f"run={sweep / '3'}"])]
    assert (tmp_path / "out" / "report.csv").is_file()
