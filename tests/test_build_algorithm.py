"""How an algorithm is built: what the run provides reaches its constructor, and a finished run it learns
from is read by the builder, when the algorithm asks, never by the algorithm itself."""

import math

import pytest
import torch
from helpers.data import REPO
from helpers.reference import tiny
from helpers.runs import overrides_for
from omegaconf import OmegaConf

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.base import SavedRun
from metalearn.algorithms.finetune import Distill
from metalearn.algorithms.protonet import ProtoNet
from metalearn.config.compose import compose
from metalearn.config.settings import component_class, settings_of
from metalearn.data import LabelledImages
from metalearn.device import resolve_fast_paths
from metalearn.distributed import Ranks
from metalearn.errors import MetalearnError
from metalearn.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

ALGOS = sorted(p.stem for p in (REPO / "conf" / "algo").glob("*.yaml"))
CPU, SHAPE = torch.device("cpu"), (1, 28, 28)
HEAD = dict(head_lr=0.01, head_momentum=0.9, head_dampening=0.9, head_weight_decay=1e-3, head_steps=2)


def config(algo: str):
    """algo's defaults on a small conv4; a finished run it needs named by a folder that holds none."""
    cls = component_class(compose([f"algo={algo}"]).algo, "algo")
    runs = [f"algo.{key}=no-run-here" for key in cls.saved_runs]
    return compose([f"algo={algo}", "model.hidden=4", *runs])


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_gets_the_run_processes_and_fast_paths_through_its_constructor(algo):
    """Built for rank 1 of 2: the algorithm averages over those ranks and knows what its model computes on.
    A finished run it needs is not read to build it (evaluation never needs it)."""
    cfg = config(algo)
    ranks = Ranks(rank=1, world=2)
    built = build_algorithm(cfg, CPU, 12, SHAPE, ranks=ranks)
    assert built.ranks is ranks
    caveat = component_class(cfg.algo, "algo").bf16_caveat(settings_of(cfg.algo, "algo"))
    assert built.fast_paths == resolve_fast_paths(cfg.device, CPU, caveat)
    assert build_algorithm(cfg, CPU, 12, SHAPE).ranks.world == 1  # by default: this process alone


class TakesNoRanks(ProtoNet):
    """An algorithm whose constructor takes no `ranks`, so it never hears of the other processes."""

    def __init__(self, model, outer_lr, lr_decay, lr_decay_every, vectorize):
        super().__init__(model, outer_lr, lr_decay, lr_decay_every, vectorize)


def test_an_algorithm_that_takes_no_ranks_is_refused_on_several_processes():
    cfg = config("protonet")
    cfg.algo._target_ = f"{__name__}.TakesNoRanks"
    with pytest.raises(MetalearnError, match="cannot train on several processes: its constructor does not hand"):
        build_algorithm(cfg, CPU, 12, SHAPE, ranks=Ranks(rank=0, world=2))
    assert build_algorithm(cfg, CPU, 12, SHAPE).ranks.world == 1  # one process: it trains as it did


def teacher_checkpoint(algo: str = "finetune", classes: int = 5) -> dict:
    """What a finished run's last.pt holds, in memory: its config, class count and classifier's weights."""
    cfg = compose(["algo=finetune", "model.hidden=4"])
    cfg.algo.name = algo
    torch.manual_seed(1)
    network = build_model(cfg.model, classes, SHAPE)
    return {
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "train_classes": classes,
        "algo": {"model": network.state_dict()},
    }


def distill(checkpoint: dict, reads: list, dtype=torch.float32) -> Distill:
    teacher = SavedRun("a-run-in-memory", lambda: reads.append("last.pt") or checkpoint)
    student = tiny(num_classes=5, dtype=dtype)
    return Distill(student, teacher=teacher, temperature=4.0, distill_weight=0.5, outer_lr=1e-3, batch_size=8, **HEAD)


def images(classes: int = 5, dtype=torch.float32) -> LabelledImages:
    g = torch.Generator().manual_seed(0)
    return LabelledImages(torch.rand(8, *SHAPE, generator=g, dtype=dtype), torch.randint(0, classes, (8,), generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distill_learns_from_the_run_it_is_handed_and_reads_no_file(dtype):
    """The teacher computes in the student's type (device.dtype=float64 too)."""
    reads = []
    algo = distill(teacher_checkpoint(), reads, dtype)
    assert reads == []  # built: nothing read
    assert math.isfinite(algo.meta_train_step(images(dtype=dtype))["loss"])
    algo.meta_train_step(images(dtype=dtype))
    assert reads == ["last.pt"]  # once, at the first step


@pytest.mark.parametrize(
    "algo,classes,message",
    [
        (
            "maml",
            5,
            "algo.teacher=a-run-in-memory is a maml run; the teacher must be a finetune or distill run "
            "(a classifier over the meta-train classes).",
        ),
        (
            "finetune",
            7,
            "algo.teacher=a-run-in-memory was trained on 7 classes, this run has 5: distil on the dataset and "
            "split the teacher was trained on.",
        ),
    ],
)
def test_distill_refuses_a_teacher_of_another_kind_or_other_classes(algo, classes, message):
    with pytest.raises(MetalearnError) as refused:
        distill(teacher_checkpoint(algo, classes), []).meta_train_step(images())
    assert str(refused.value) == message


def test_a_teacher_run_without_a_checkpoint_is_one_error_at_the_first_step(cli, tiny_overrides, tmp_path):
    student = overrides_for("finetune", tiny_overrides)
    student[0] = "algo=distill"
    missing = tmp_path / "no-teacher"
    result = cli(
        "train", *student, f"algo.teacher={missing}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"metalearn: error: No checkpoint at {missing / 'checkpoints' / 'last.pt'}." in result.stderr
