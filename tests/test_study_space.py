"""The study's search space from Hydra's sweep syntax, the grid sampler's grid, and the samplers and pruners as
config groups, built as the sweeper (and each trial's job) builds them."""

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metalearn.config.compose import compose
from metalearn.errors import MetalearnError

optuna = pytest.importorskip("optuna", reason="the sweep extra: pip install '.[sweep]'")
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402

from hydra_plugins.metalearn_study.search_space import as_override, grid, search_space  # noqa: E402
from metalearn.study_trial import build_pruner  # noqa: E402


def test_each_sweep_form_becomes_its_distribution_and_the_command_line_wins():
    params = {
        "algo.inner_lr": "tag(log, interval(0.05, 1.0))",
        "algo.outer_lr": "interval(0.0001, 0.01)",
        "algo.inner_steps": "range(1, 5)",
        "task.train.ways": "choice(5, 20, 60)",
        "model.hidden": "tag(int, interval(8.5, 64))",
        "algo.lr_decay": "range(0.25, 1.0, 0.25)",
    }
    space, fixed = search_space(params, ["algo.outer_lr=0.001", "seed=1,2", "hydra.job.chdir=false"])
    assert space == {
        "algo.inner_lr": FloatDistribution(0.05, 1.0, log=True),
        "algo.inner_steps": IntDistribution(1, 4),  # Hydra's range leaves its end out
        "task.train.ways": CategoricalDistribution([5, 20, 60]),
        "model.hidden": IntDistribution(9, 64),
        "algo.lr_decay": FloatDistribution(0.25, 0.75, step=0.25),
        "seed": CategoricalDistribution([1, 2]),  # a,b on the command line: a choice
    }
    assert fixed == ["algo.outer_lr=0.001", "hydra.job.chdir=false"]  # the command line fixed a searched key


@pytest.mark.parametrize(
    "override, message",
    [
        ("a=interval(1.0, 0.5)", "an interval's start must be below its end"),
        ("a=tag(log, interval(0, 1))", "a log scale needs a start above 0"),
        ("a=range(5, 1)", "holds no value"),
    ],
)
def test_an_impossible_space_is_refused_by_name(override, message):
    with pytest.raises(MetalearnError, match=message):
        search_space({}, [override])


def test_the_grid_lists_every_value_and_refuses_an_interval():
    space, _ = search_space({}, ["a=choice(x,y)", "b=range(1,4)", "c=range(0.5,1.5,0.5)"])
    assert grid(space) == {"a": ["x", "y"], "b": [1, 2, 3], "c": [0.5, 1.0]}
    with pytest.raises(MetalearnError, match="the grid sampler needs a list of values for each key, and d"):
        grid(search_space({}, ["d=interval(0, 1)"])[0])


@pytest.mark.parametrize("value", [0.1, 1e-30, 1e30, 3, "maml", True])
def test_a_sampled_value_goes_back_to_the_job_as_itself(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(as_override("k", value)).value() == value


PRUNERS = {
    "none": (optuna.pruners.NopPruner, {}),
    "median": (optuna.pruners.MedianPruner, {"_n_startup_trials": 5}),
    "successive_halving": (optuna.pruners.SuccessiveHalvingPruner, {"_min_resource": 50, "_reduction_factor": 3}),
    "hyperband": (optuna.pruners.HyperbandPruner, {"_min_resource": 50, "_max_resource": 700}),
}


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_each_pruner_is_built_with_the_runs_steps_by_the_sweeper_and_by_the_job(name):
    cls, attributes = PRUNERS[name]
    cfg = compose(
        ["hparams_search=protonet", f"hydra/sweeper/pruner={name}", "train.steps=700", "train.val_every=50"],
        with_hydra=True,
    )
    in_sweeper = instantiate(cfg.hydra.sweeper.pruner)  # the whole config at hand
    # a job sees its Hydra node apart from the run's keys (HydraConfig holds a copy of `hydra` alone)
    hydra_alone = OmegaConf.masked_copy(cfg, "hydra").hydra
    in_job = build_pruner(hydra_alone.sweeper, OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    for pruner in (in_sweeper, in_job):
        assert type(pruner) is cls
        assert {key: getattr(pruner, key) for key in attributes} == attributes


@pytest.mark.parametrize("name", ["tpe", "random", "grid"])
def test_each_sampler_is_chosen_as_a_group_and_seeded(name):
    cfg = compose(["hparams_search=maml", f"hydra/sweeper/sampler={name}", "seed=3"], with_hydra=True)
    sampler = cfg.hydra.sweeper.sampler
    assert sampler.seed == 3
    assert sampler._target_.endswith({"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}[name])
