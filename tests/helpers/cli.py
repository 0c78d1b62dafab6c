"""Two ways to run `metalearn`: in this process (fast), or the installed console script in a subprocess.

`metalearn_in_process` runs metalearn.cli.main in the test process (the same
entry point as the console script, minus the seconds each new process spends
importing torch); `metalearn_cli` runs the console script, for what only a
real process shows (signals, the script itself).
"""

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path


def metalearn_cli(*args, cwd=None, check=True, timeout=900, **popen) -> subprocess.CompletedProcess:
    """Run the installed `metalearn` console script; on failure show its output."""
    exe = Path(sys.executable).parent / "metalearn"
    command = [str(exe) if exe.exists() else "metalearn", *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def metalearn_in_process(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """`metalearn <args>` through metalearn.cli.main in this process: its exit code, stdout and stderr."""
    from metalearn.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    previous_dir, previous_argv = os.getcwd(), list(sys.argv)
    code = 0
    try:
        os.chdir(cwd or previous_dir)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # a bug, not a user error: show it like an uncaught exception would
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous_dir)
        sys.argv = previous_argv
    result = subprocess.CompletedProcess(["metalearn", *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"metalearn {' '.join(argv)} failed ({code}):\n{result.stdout}\n{result.stderr}")
    return result
