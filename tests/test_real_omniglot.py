"""A short MAML run on the real Omniglot: it must learn (skipped without the data)."""

import json

import pytest
from helpers.cli import metalearn_cli
from helpers.data import SHARED_DATA

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "omniglot-py" / "images_background.zip").is_file(),
    reason=f"the real Omniglot is not at {SHARED_DATA}/omniglot-py (see shared/data/README.md)",
)


def test_first_order_maml_learns_on_real_omniglot(tmp_path):
    # One inner step at test time: an untrained conv4 then scores chance (20%),
    # so anything well above it was learned.
    run = tmp_path / "run"
    metalearn_cli(
        "train",
        "algo=fomaml",
        f"data.root={SHARED_DATA}",
        "task.queries=5",
        "device=cpu",
        "train.steps=60",
        "train.meta_batch_size=8",
        "train.val_every=60",
        "train.val_episodes=100",
        "algo.inner_steps_eval=1",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    val = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "val"
    ]
    assert val[-1]["accuracy"] > 0.30, val
    out = metalearn_cli("eval", f"run={run}", "eval.episodes=100", cwd=tmp_path).stdout
    assert "(100 episodes, omniglot 5-way 1-shot, best.pt)" in out
    test = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert test["accuracy"] > 0.30, test
