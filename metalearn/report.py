"""`metalearn report <folder> ...`: a sweep's runs grouped by their settings, as a table and plots.

Runs are the folders below the given ones that hold .hydra/overrides.yaml.
A group is the runs whose overrides are equal but for the seed (and where
the data lives): per group the runs, the steps they reached, the best
validation accuracy and the latest test result of each run as a mean with a
95% interval across seeds, tasks (or images) per second and wall time.
Runs that are still going, stopped, pruned by an Optuna study, failed (an error in their train.log)
or never evaluated stay in the table, marked as such. Writes report.csv, report.md and three PNG plots.
"""

import csv
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from metalearn.confidence import ci95
from metalearn.errors import MetalearnError
from metalearn.storage.run_folder import written_overrides
from metalearn.storage.trial_record import pruned_step

# Overrides that do not make two runs different experiments.
NOT_SETTINGS = ("seed", "data.root", "data.cache_dir", "hydra.", "resume")
PLOTS = ("val_accuracy.png", "train_loss.png", "test_accuracy.png")
FIGURE_SIZE, DPI = (8, 5), 100  # 800 x 500 pixels


@dataclass
class Run:
    folder: Path
    settings: tuple  # its overrides without the seed: the group it belongs to
    steps: int  # train.steps it was started (or last resumed) with
    records: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    error: str | None = None  # why the run stopped, when its log says (a sweep's runs log their errors)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # file name: its lines that are no records, and why
    pruned_at: int | None = None  # the step at which an Optuna study's pruner stopped it (trial.json)

    @property
    def step(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    @property
    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if not self.records:
            return "not started"
        if self.pruned_at is not None and self.step <= self.pruned_at:  # not resumed past it since
            return f"pruned at step {self.pruned_at}"
        if self.step < self.steps:
            return f"stopped or running at step {self.step}"
        return "done" if self.evals else "done, not evaluated"

    def series(self, split: str, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.records if r["split"] == split and r.get(key) is not None}

    @property
    def best_val(self) -> float | None:
        return max(self.series("val", "accuracy").values(), default=None)

    @property
    def test(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    @property
    def rate(self) -> float | None:
        rates = [r.get("tasks_per_s", r.get("images_per_s")) for r in self.records if r["split"] == "train"]
        rates = [r for r in rates if r is not None]
        return statistics.mean(rates) if rates else None

    @property
    def wall(self) -> float | None:
        times = [r["time"] for r in self.records if r.get("time") is not None]
        return max(times) if times else None


# What a line of each file must be to count, besides a JSON object: the fields the report reads.
METRIC_NUMBERS = ("loss", "accuracy", "ci95", "tasks_per_s", "images_per_s", "time")  # each a number or null
EVAL_NUMBERS = ("accuracy", "ci95")  # each a number
LARGEST = 1e100  # beyond any float32 (3.4e38); 100 times it, and its square, are still finite floats


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= LARGEST


def metric_problem(record) -> str | None:
    """Why a line of metrics.jsonl is not a record the report can read; None when it is one."""
    if not isinstance(record, dict):
        return f"{_json_kind(record)}, not an object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= LARGEST:
        return "no step (a whole number)"
    if not isinstance(record.get("split"), str):
        return "no split"
    wrong = [key for key in METRIC_NUMBERS if record.get(key) is not None and not _number(record[key])]
    return f"{wrong[0]} is not a number" if wrong else None


def eval_problem(record) -> str | None:
    """Why a line of evals.jsonl is not a result the report can read; None when it is one."""
    if not isinstance(record, dict):
        return f"{_json_kind(record)}, not an object"
    wrong = [key for key in EVAL_NUMBERS if not _number(record.get(key))]
    return f"{wrong[0]} is not a number" if wrong else None


def _json_kind(value) -> str:
    kinds = {type(None): "null", bool: "true or false", str: "a string", list: "a list"}
    return kinds.get(type(value), "a number")


def _jsonl(path: Path, problem: Callable[[object], str | None]) -> tuple[list[dict], list[str]]:
    """A JSON-lines file's records, and why each line that is none was skipped ("line 3: null, not an object"):
    a line cut short by a crash, or one edited or written by something else."""
    if not path.is_file():
        return [], []
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise MetalearnError(
            f"cannot read {path} ({err.strerror or err}): make it readable, or leave its run out."
        ) from None
    records, skipped = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON (a JSONDecodeError), or beyond what Python reads
            why = "not JSON (cut short?)"
        else:
            why = problem(record)
        if why is None:
            records.append(record)
        else:
            skipped.append(f"line {number}: {why}")
    return records, skipped


def logged_error(log: Path) -> str | None:
    """The first clause of the last error in a run's train.log ("training diverged at step 12"), if any
    since the run was last resumed."""
    if not log.is_file():
        return None
    error = None
    for line in log.read_text().splitlines():
        if "[ERROR] - " in line:
            error = line.split("[ERROR] - ", 1)[1].split(":", 1)[0].strip()[:80]
        elif "] - resuming " in line:
            error = None
    return error


def _saved_overrides(record: Path) -> list[str] | None:
    """A run's overrides as written (`task.train.ways=${task.ways}` stays text); None if the file is damaged."""
    try:
        saved = OmegaConf.load(record)
    except Exception:  # a YAML or OmegaConf error of a damaged record: the run is skipped, the report goes on
        return None
    return written_overrides(saved) if isinstance(saved, ListConfig) else None


def _planned_steps(config: Path) -> int:
    """train.steps of a run's composed config; 0 when it is missing or cannot be read."""
    try:
        return int(OmegaConf.load(config).train.steps) if config.is_file() else 0
    except Exception:  # damaged, or an interpolation that needs Hydra's resolvers: the table shows no progress
        return 0


def find_runs(folders: Sequence[str]) -> list[Run]:
    found = []
    for folder in folders:
        root = Path(folder)
        if not root.exists():
            raise MetalearnError(f"{root} does not exist.")
        for record in sorted(root.glob("**/.hydra/overrides.yaml")):
            run = record.parent.parent
            overrides = _saved_overrides(record)
            if overrides is None:
                print(f"metalearn: note: skipped {run}: its .hydra/overrides.yaml cannot be read", file=sys.stderr)
                continue
            settings = tuple(o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(NOT_SETTINGS))
            steps = _planned_steps(run / ".hydra" / "config.yaml")
            records, bad_records = _jsonl(run / "metrics.jsonl", metric_problem)
            evals, bad_evals = _jsonl(run / "evals.jsonl", eval_problem)
            skipped = {name: bad for name, bad in (("metrics.jsonl", bad_records), ("evals.jsonl", bad_evals)) if bad}
            error = logged_error(run / "train.log")
            found.append(Run(run, settings, steps, records, evals, error, skipped, pruned_step(run)))
    if not found:
        raise MetalearnError(f"no runs under {', '.join(folders)} (folders holding .hydra/overrides.yaml).")
    return found


def mean_ci(values: Sequence[float]):
    """Mean and the half-width of its 95% interval across runs (0 for one run)."""
    if not values:
        return None, None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), ci95(spread, len(values))


def common_settings(runs: list[Run]) -> tuple:
    """The overrides every run shares: said once, above the table, not in each group's name."""
    shared = set(runs[0].settings).intersection(*(r.settings for r in runs[1:]))
    return tuple(o for o in runs[0].settings if o in shared)


def group_name(run: Run, common: tuple) -> str:
    return " ".join(o for o in run.settings if o not in common) or "(defaults)"


def _short(setting: str) -> str:
    """A sampled float (an Optuna trial's 0.0012520653814999472) to 4 significant digits: 0.001252."""
    key, _, value = setting.partition("=")
    try:
        return f"{key}={float(value):.4g}" if any(c in value for c in ".e") else setting
    except ValueError:
        return setting


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
    common = common_settings(runs) if len({r.settings for r in runs}) > 1 else ()
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_name(run, common), []).append(run)
    labels = {name: " ".join(_short(s) for s in name.split(" ")) for name in groups}
    if len(set(labels.values())) < len(labels):  # shortened, two groups would read the same: keep every digit
        return groups
    return {labels[name]: members for name, members in groups.items()}


def group_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for name, members in by_group(runs).items():
        best, best_ci = mean_ci([r.best_val for r in members if r.best_val is not None])
        tests = [r.test for r in members if r.test]
        test, test_ci = mean_ci([t["accuracy"] for t in tests])
        rate, _ = mean_ci([r.rate for r in members if r.rate is not None])
        wall, _ = mean_ci([r.wall for r in members if r.wall is not None])
        statuses = sorted({r.status for r in members})
        rows.append(
            {
                "group": name,
                "runs": len(members),
                "steps": "/".join(str(s) for s in sorted({r.step for r in members})),
                "best_val": best,
                "best_val_ci95": best_ci,
                "test": test,
                "test_ci95": test_ci,
                "tested": len(tests),
                "test_per_run": "; ".join(f"{100 * t['accuracy']:.2f}±{100 * t['ci95']:.2f}" for t in tests),
                "rate_per_s": rate,
                "wall_s": wall,
                "status": ", ".join(statuses),
            }
        )
    return rows


def _percent(value, ci) -> str:
    return "-" if value is None else f"{100 * value:.2f} ± {100 * ci:.2f}"


COLUMNS = ("group", "runs", "steps", "best val %", "test %", "per-run test %", "rate/s", "wall s", "status")


def _cells(row: dict) -> list[str]:
    return [
        row["group"],
        str(row["runs"]),
        row["steps"],
        _percent(row["best_val"], row["best_val_ci95"]),
        _percent(row["test"], row["test_ci95"]) + (f" ({row['tested']} of {row['runs']})" if row["test"] else ""),
        row["test_per_run"] or "-",
        "-" if row["rate_per_s"] is None else f"{row['rate_per_s']:.1f}",
        "-" if row["wall_s"] is None else f"{row['wall_s']:.0f}",
        row["status"],
    ]


def table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plots(runs: list[Run], rows: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MetalearnError("metalearn report draws with matplotlib: pip install '.[report]'.") from None
    from matplotlib.ticker import MaxNLocator

    groups = by_group(runs)
    written = []
    for name, split, key, label in (
        (PLOTS[0], "val", "accuracy", "validation accuracy (%)"),
        (PLOTS[1], "train", "loss", "training loss"),
    ):
        figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
        for group, members in groups.items():
            series = [r.series(split, key) for r in members]
            steps = sorted(set().union(*series))
            if not steps:
                continue
            scale = 100 if key == "accuracy" else 1
            stats = [mean_ci([scale * s[step] for s in series if step in s]) for step in steps]
            mean = [m for m, _ in stats]
            marker = "o" if len(steps) <= 20 else None  # a few validations: show where they were
            axes.plot(
                steps, mean, marker=marker, label=f"{group} ({len(members)} run{'s' if len(members) > 1 else ''})"
            )
            axes.fill_between(steps, [m - c for m, c in stats], [m + c for m, c in stats], alpha=0.2)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.set_title(f"{label} against step: mean and 95% interval across seeds")
        if len(groups) <= 4:
            axes.legend(fontsize="small")
        else:  # many groups (a study's trials): the legend below the axes, not over the lines
            axes.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        figure.tight_layout()
        figure.savefig(out / name)
        plt.close(figure)
        written.append(out / name)
    figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
    tested = [r for r in rows if r["test"] is not None]
    axes.bar(
        range(len(tested)),
        [100 * r["test"] for r in tested],
        yerr=[100 * r["test_ci95"] for r in tested],
        capsize=6,
    )
    axes.set_xticks(range(len(tested)), [r["group"] for r in tested], rotation=15, ha="right", fontsize="small")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("test accuracy per group: mean and 95% interval across seeds")
    figure.tight_layout()
    figure.savefig(out / PLOTS[2])
    plt.close(figure)
    written.append(out / PLOTS[2])
    return written


def note_skipped_lines(runs: list[Run]) -> None:
    """One note per file with lines the report skipped: how many, and the first's number and why."""
    for run in runs:
        for name, skipped in run.skipped.items():
            kind = "metric record" if name == "metrics.jsonl" else "evaluation result"
            lines = f"{len(skipped)} lines that are no {kind}s" if len(skipped) > 1 else f"1 line that is no {kind}"
            more, them = (", ...", "them") if len(skipped) > 1 else ("", "it")
            print(
                f"metalearn: note: skipped {lines} in {run.folder / name} ({skipped[0]}{more}); the report goes on "
                f"without {them}.",
                file=sys.stderr,
            )


def report(folders: Sequence[str], out: str | None = None) -> list[dict]:
    runs = find_runs(folders)
    note_skipped_lines(runs)
    rows = group_rows(runs)
    target = Path(out) if out else Path(folders[0])
    if target.exists() and not target.is_dir():
        raise MetalearnError(f"out={target} is a file: the report writes a table and plots into a folder, name one.")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MetalearnError(f"cannot make the report's folder {target} ({err.strerror or err}).") from None
    common = common_settings(runs)
    if common and len(rows) > 1:
        print(f"every run: {' '.join(common)}")
    print(table(rows))
    with open(target / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (target / "report.md").write_text(markdown(rows))
    written = plots(runs, rows, target)
    print(f"\n{len(runs)} runs in {len(rows)} groups; report.csv, report.md and {len(written)} plots in {target}")
    return rows
