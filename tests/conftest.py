"""Shared fixtures: a tiny generated Omniglot, and two ways to run the CLI.

`cli` runs `metalearn ...` inside the test process (the same entry point as
the console script, minus the seconds each new process spends importing
torch); `metalearn_cli` runs the installed console script in a subprocess,
for what only a real process shows (signals, the script itself).
"""

import contextlib
import io
import os
import subprocess
import sys
import traceback
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny Omniglot: alphabet -> (archive, number of characters).
TINY_ALPHABETS = {"Alpha": ("images_background", 8), "Beta": ("images_evaluation", 4)}
TINY_SPLIT = {
    # train: 6 characters x 2 rotations = 12 classes; val: 2 x 4 = 8; test: 4 x 4 = 16
    "train": [f"Alpha/character{c:02d}/rot{r:03d}" for c in range(1, 7) for r in (0, 90)],
    "val": [f"Alpha/character{c:02d}/rot{r:03d}" for c in (7, 8) for r in (0, 90, 180, 270)],
    "test": [f"Beta/character{c:02d}/rot{r:03d}" for c in range(1, 5) for r in (0, 90, 180, 270)],
}


def drawing(character_seed: int, drawer: int) -> Image.Image:
    """A 105x105 1-bit image, ink black on white like Omniglot: the character's
    strokes (fixed by its seed), slightly shifted per drawer."""
    g = torch.Generator().manual_seed(character_seed)
    canvas = torch.ones(105, 105, dtype=torch.uint8)
    shift = torch.randint(-3, 4, (2,), generator=torch.Generator().manual_seed(1000 * character_seed + drawer))
    for _ in range(4):
        y, x = (torch.randint(15, 75, (2,), generator=g) + shift).tolist()
        h, w = torch.randint(6, 30, (2,), generator=g).tolist()
        canvas[y : y + h, x : x + w] = 0
    return Image.fromarray(canvas.mul(255).numpy()).convert("1")


def write_tiny_omniglot(root: Path, as_zip: bool = True) -> Path:
    base = root / "omniglot-py"
    base.mkdir(parents=True, exist_ok=True)
    seed, global_id = 0, 0
    files = {}
    for alphabet, (archive, characters) in TINY_ALPHABETS.items():
        for c in range(1, characters + 1):
            seed += 1
            global_id += 1
            for d in range(1, 21):
                buffer = io.BytesIO()
                drawing(seed, d).save(buffer, format="PNG")
                files.setdefault(archive, {})[f"{archive}/{alphabet}/character{c:02d}/{global_id:04d}_{d:02d}.png"] = (
                    buffer.getvalue()
                )
    for archive, members in files.items():
        if as_zip:
            with zipfile.ZipFile(base / f"{archive}.zip", "w") as z:
                for name, data in members.items():
                    z.writestr(name, data)
        else:
            for name, data in members.items():
                path = base / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root


def write_tiny_split(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, classes in TINY_SPLIT.items():
        (folder / f"{part}.txt").write_text("\n".join(classes) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A generated Omniglot under root/, its split folder, and a cache folder."""
    base = tmp_path_factory.mktemp("tiny")
    root = write_tiny_omniglot(base / "root")
    split = write_tiny_split(base / "split")
    return {"root": root, "split": split, "cache": base / "cache"}


@pytest.fixture
def tiny_overrides(tiny_data) -> list:
    """Overrides for a fast CLI run on the tiny data (a few steps, tiny validation)."""
    return [
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
        "data.queries=3",
        "model.hidden=8",
        "algo.inner_steps_eval=2",
        "train.steps=4",
        "train.meta_batch_size=2",
        "train.val_every=2",
        "train.val_episodes=4",
        "train.ckpt_every=2",
        "train.log_every=1",
        "eval.episodes=10",
        "device=cpu",
    ]


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


@pytest.fixture
def cli():
    return metalearn_in_process
