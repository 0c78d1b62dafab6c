"""What a clone and a wheel carry: the configs and split lists a plain `pip install .` needs, and the checks CI runs."""

import subprocess
import sys
import zipfile

from helpers.data import REPO


def test_wheel_ships_configs_and_split_lists(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("metalearn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "metalearn/conf/train.yaml",
        "metalearn/conf/eval.yaml",
        "metalearn/conf/export.yaml",
        "metalearn/conf/hydra/launcher/slurm.yaml",
        "metalearn/conf/hydra/sweeper/optuna.yaml",
        "metalearn/conf/hydra/sweeper/pruner/hyperband.yaml",
        "metalearn/conf/hydra/sweeper/sampler/grid.yaml",
        "metalearn/conf/logger/tensorboard.yaml",
        "metalearn/conf/algo/maml.yaml",
        "metalearn/conf/algo/fomaml.yaml",
        "metalearn/conf/data/omniglot.yaml",
        "metalearn/conf/model/conv4.yaml",
        "metalearn/conf/device/cuda.yaml",
        "metalearn/conf/experiment/maml_omniglot_20w1s.yaml",
        "metalearn/loggers/jsonl.py",
        "metalearn/models/layout.py",
        "metalearn/data/splits/omniglot/vinyals/train.txt",
        "metalearn/data/splits/omniglot/lake/test.txt",
    }
    assert expected <= names, expected - names


def test_pre_commit_runs_the_ruff_checks_of_ci():
    """The hooks run ruff check and ruff format from the environment, the ruff the dev extra pins and CI runs."""
    import yaml

    repo = REPO
    hooks = [h for r in yaml.safe_load((repo / ".pre-commit-config.yaml").read_text())["repos"] for h in r["hooks"]]
    entries = {h["entry"].split(" --")[0] for h in hooks if h["language"] == "system"}
    ci = (repo / ".ci" / "run").read_text()
    assert entries == {"ruff check", "ruff format"}
    assert all(entry in ci for entry in entries)
    assert '"ruff==' in (repo / "pyproject.toml").read_text()
