"""`metalearn report` on a generated sweep: every figure equals the one computed by hand from the files."""

import csv
import json
import math
import statistics

import pytest
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
