"""`metalearn report <folder> ... [out=<folder>] [--eval]`: plain arguments, no config to compose."""

from collections.abc import Callable

from metalearn.errors import MetalearnError

USAGE = """usage: metalearn report <folder> [more folders] [out=<folder>] [--eval]

A sweep's runs (the folders below the given ones that hold .hydra/overrides.yaml) grouped by their settings
but the seed: a table on the terminal, report.csv, report.md and plots, written to out= (default: the
first folder). --eval first scores, with `metalearn eval`, the runs that have a best checkpoint but no
test result, on the same test episodes."""


def run(args: list[str], run_command: Callable[[str, list[str]], None]) -> None:
    """--eval first scores, with `run_command("eval", ...)`, each run that has a best checkpoint but no test
    result: the same test episodes for every run (eval's fixed eval.seed)."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    from metalearn.report import find_runs, report

    out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), None)
    folders = [a for a in args if not a.startswith("out=") and a != "--eval"]
    if not folders:
        raise MetalearnError("report needs a folder: metalearn report <sweep or run folder> [...].")
    if "--eval" in args:
        for found in find_runs(folders):
            if not found.evals and (found.folder / "checkpoints" / "best.pt").is_file():
                run_command("eval", [f"run={found.folder}"])
    report(folders, out)
