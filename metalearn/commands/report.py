"""`metalearn report <folder> ... [out=<folder>] [--eval]`: plain arguments, no config to compose."""

from collections.abc import Callable

from metalearn.errors import MetalearnError


def run(args: list[str], run_command: Callable[[str, list[str]], None]) -> None:
    """--eval first scores, with `run_command("eval", ...)`, each run that has a best checkpoint but no test
    result: the same test episodes for every run (eval's fixed eval.seed)."""
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
