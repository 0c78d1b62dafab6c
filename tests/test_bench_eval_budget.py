"""`scripts/bench.py eval` and `budget`: what they count and compare is what they say.

The timings themselves live in the scripts; here the FLOP count must see every
adaptation step, the budget comparison must start learn2learn from the weights
`metalearn train` starts from, and score with what `metalearn eval` computes.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers.data import REPO

from metalearn.config.compose import compose


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchmarks import budget, evaluation

    return evaluation, budget


def tiny(tiny_overrides) -> list:
    return [o for o in tiny_overrides if not o.startswith(("train.", "eval."))] + ["train.val_episodes=2"]


def test_eval_flops_count_every_adaptation_step(scripts, cli, tiny_overrides, tmp_path):
    evaluation, _ = scripts
    runs = {}
    for steps in (2, 6):
        runs[steps] = tmp_path / f"maml-{steps}"
        cli(
            "train",
            "algo=maml",
            *tiny(tiny_overrides),
            f"algo.inner_steps_eval={steps}",
            "train.steps=1",
            "train.val_every=1",
            f"hydra.run.dir={runs[steps]}",
        )
    one = evaluation.eval_flops(runs[2], 1)
    assert one > 0 and evaluation.eval_flops(runs[2], 10) == 10 * one
    # 4 more fine-tuning steps (forward and backward on the support set) on top of the query pass
    assert evaluation.eval_flops(runs[6], 1) > 1.5 * one


def test_budget_bench_starts_from_the_runs_weights_and_scores_as_metalearn_eval(scripts, cli, tiny_overrides, tmp_path):
    _, budget = scripts
    data_root = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("data.root="))
    extra = [o for o in tiny(tiny_overrides) if not o.startswith("data.root=")]
    # An outer rate of 1e-30 leaves the weights where `metalearn train` started them.
    overrides = budget.run_overrides(data_root, 3, extra + ["algo.outer_lr=1e-30", "train.val_every=1"])
    folder = tmp_path / "metalearn"
    steps = budget.train_metalearn(overrides, 0.001, folder)
    assert steps >= 1
    cfg = budget.compose(overrides)
    trained = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["algo"]["model"]
    start = budget.initial_weights(cfg)
    assert trained.keys() == start.keys()
    assert all(torch.allclose(trained[k], start[k], rtol=0, atol=1e-20) for k in start)
    other_seed = budget.initial_weights(budget.compose(budget.run_overrides(data_root, 4, extra)))
    assert not torch.allclose(other_seed["head.weight"], start["head.weight"])

    result = budget.score(cfg, trained, episodes=10)
    cli("eval", f"run={folder}", "checkpoint=last", "eval.episodes=10")
    record = json.loads((folder / "evals.jsonl").read_text().splitlines()[-1])
    assert (result.accuracy, result.loss, result.episode_digest) == (
        record["accuracy"],
        record["loss"],
        record["episode_digest"],
    )


def test_budget_bench_validates_metalearn_only_after_the_budget(scripts):
    _, budget = scripts
    overrides = budget.run_overrides("/data", 0, ["train.steps=700", "train.val_every=1"])
    cfg = compose([o for o in budget.budget_overrides(overrides, 5, Path("/runs/x")) if not o.startswith("hydra.")])
    assert (cfg.train.val_every, cfg.train.max_minutes) == (700, 5)


def test_budget_bench_scores_each_library_in_the_precision_it_trained_in(scripts):
    _, budget = scripts
    overrides = budget.run_overrides("/data", 0)
    assert budget.precision(compose([*overrides, budget.LEARN2LEARN_PRECISION])) == "float32"
    assert budget.precision(compose([*overrides, "device.amp=true"])) == "bf16"
    assert budget.precision(compose([*overrides, "device.amp=true", "device.dtype=float64"])) == "float32"
