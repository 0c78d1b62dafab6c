"""The wheel carries the configs and split lists, so a plain `pip install .` works anywhere."""

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
