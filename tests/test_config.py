"""Every range check and every experiment preset, composed in-process as `metalearn train` composes them."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from metalearn.config.schema import register_schemas
from metalearn.config.validate import validate
from metalearn.errors import MetalearnError

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "experiment").glob("*.yaml"))


def composed(*overrides):
    register_schemas()
    with initialize_config_module(config_module="metalearn.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


# (algorithm, key, the smallest value refused, the smallest accepted)
RANGES = [
    ("maml", "task.ways", 1, 2),
    ("maml", "task.shots", 0, 1),
    ("maml", "task.queries", 0, 1),
    ("maml", "train.steps", 0, 1),
    ("maml", "train.meta_batch_size", 0, 1),
    ("maml", "train.val_every", 0, 1),
    ("maml", "train.val_episodes", 0, 1),
    ("maml", "train.ckpt_every", 0, 1),
    ("maml", "train.log_every", 0, 1),
    ("maml", "train.keep_best", 0, 1),
    ("maml", "eval.episodes", 0, 1),
    ("maml", "eval.batch_size", 0, 1),
    ("maml", "algo.outer_lr", 0, 1e-9),
    ("maml", "algo.inner_lr", 0, 1e-9),
    ("maml", "algo.inner_steps", 0, 1),
    ("maml", "algo.inner_steps_eval", 0, 1),
    ("maml", "task.train.shots", 0, 1),
    ("protonet", "task.train.ways", 1, 2),
    ("protonet", "task.train.queries", -1, 0),
    ("maml", "train.replay.size", 0, 1),
    ("protonet", "algo.lr_decay_every", 0, 1),
    ("reptile", "algo.inner_batch", 0, 1),
    ("reptile", "algo.inner_batch_eval", 0, 1),
    ("reptile", "algo.anneal_steps", 0, 1),
    ("reptile", "algo.meta_step", 0, 1e-9),
    ("finetune", "algo.batch_size", 0, 1),
    ("finetune", "algo.head_lr", 0, 1e-9),
    ("finetune", "algo.head_steps", 0, 1),
    ("distill", "algo.temperature", 0, 1e-9),
    ("distill", "algo.distill_weight", -0.01, 0.0),
    ("distill", "algo.distill_weight", 1.01, 1.0),
    ("maml", "device.amp", "maybe", "auto"),
]


@pytest.mark.parametrize("algo,key,refused,accepted", RANGES, ids=[f"{r[1]}={r[2]}" for r in RANGES])
def test_range_checks_refuse_the_first_value_outside(algo, key, refused, accepted):
    extra = ["algo.teacher=some-run"] if algo == "distill" else []
    with pytest.raises(MetalearnError, match=re.escape(key)):
        validate(composed(f"algo={algo}", f"{key}={refused}", *extra))
    validate(composed(f"algo={algo}", f"{key}={accepted}", *extra))


def test_device_amp_takes_auto_true_and_false():
    for value in ("auto", "true", "false", "True"):
        validate(composed(f"device.amp={value}"))
    assert composed().device.amp == "auto"


@pytest.mark.parametrize("preset", PRESETS)
def test_experiment_preset_composes_with_the_settings_it_names(preset):
    cfg = composed(f"experiment={preset}")
    validate(cfg)
    algo, dataset, shape = preset.split("_")
    ways, shots = map(int, re.fullmatch(r"(\d+)w(\d+)s", shape).groups())
    assert (cfg.algo.name, cfg.data.name, cfg.task.ways, cfg.task.shots) == (algo, dataset, ways, shots)
    if algo in ("maml", "fomaml", "anil"):
        # Finn et al.'s code: the summed support loss over the shots, K training queries, 10 test steps,
        # step size 0.4 and one step (5-way) or 0.1 and five steps (20-way), 32 or 16 tasks a batch
        assert cfg.algo.inner_loss == "sum_over_shots"
        assert cfg.task.train.queries == shots and cfg.algo.inner_steps_eval == 10
        assert (cfg.algo.inner_lr, cfg.algo.inner_steps, cfg.train.meta_batch_size) == (
            (0.4, 1, 32) if ways == 5 else (0.1, 5, 16)
        )
        assert cfg.algo.first_order == (algo == "fomaml") and cfg.train.steps == 60000
    if algo == "metasgd":
        assert cfg.algo.inner_loss == "mean" and cfg.algo.learn_inner_lr
    if algo == "protonet":
        assert cfg.task.train.ways == 60 and cfg.task.train.queries == 5
    if algo == "reptile":
        assert cfg.algo.meta_step == 1.0 and cfg.algo.meta_step_final == 0.0 and cfg.algo.anneal_steps is None


def test_inner_loss_defaults_to_the_mean():
    for algo in ("maml", "fomaml", "anil", "metasgd"):
        assert composed(f"algo={algo}").algo.inner_loss == "mean"
