"""model.bn: transductive and inductive BatchNorm, and the running statistics the inductive mode keeps."""

import pytest
import torch
from helpers.reference import episodes
from torch import nn

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.batching import Vectorize, loop_only
from metalearn.config.compose import compose
from metalearn.errors import MetalearnError
from metalearn.models import Conv4
from metalearn.models.batch_stats import recording
from metalearn.models.layout import BatchNorm2d

WAYS = 3
ALGOS = {
    "maml": ["algo.inner_steps=2", "algo.inner_steps_eval=2"],
    "protonet": [],
    "reptile": ["algo.inner_steps=2", "algo.inner_batch=3", "algo.inner_steps_eval=2", "algo.inner_batch_eval=3"],
    "finetune": ["algo.head_steps=3"],
}


def algorithm(name, bn, *overrides, train_classes=6):
    cfg = compose(
        [
            f"algo={name}",
            f"task.ways={WAYS}",
            "model.hidden=4",
            "device.amp=false",
            f"model.bn={bn}",
            *ALGOS[name],
            *overrides,
        ]
    )
    torch.manual_seed(0)
    return build_algorithm(cfg, torch.device("cpu"), train_classes, (1, 28, 28), dtype=torch.float64)


def train_batch(algo, batch):
    if algo.__class__.__name__ == "Finetune":
        from metalearn.data import LabelledImages

        return LabelledImages(batch.support.flatten(0, 1), batch.support_labels.flatten())
    return batch


def running_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def test_recorded_statistics_fold_in_as_torch_updates_in_place():
    torch.manual_seed(0)
    ours, torchs = BatchNorm2d(5, momentum=0.3).double(), nn.BatchNorm2d(5, momentum=0.3).double()
    batches = [torch.randn(4, 5, 3, 3, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    with recording([ours]) as recorder:
        for x in batches:
            assert torch.allclose(ours(x), torchs(x), atol=1e-12)  # batch statistics normalise in training
    assert ours.running_mean.abs().max() == 0  # nothing folded in during the passes
    recorder.commit(ours)
    # to float64's precision: the noted statistics keep the run's type (float32 would be off by 1e-7)
    assert torch.allclose(ours.running_mean, torchs.running_mean, rtol=0, atol=1e-12)
    assert torch.allclose(ours.running_var, torchs.running_var, rtol=0, atol=1e-12)
    assert ours.num_batches_tracked == torchs.num_batches_tracked == 3
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    assert torch.allclose(ours.eval()(x), torchs.eval()(x), atol=1e-12)  # running statistics at test time


@pytest.mark.parametrize("name", ALGOS)
def test_inductive_training_keeps_running_statistics_and_classifies_each_query_alone(name):
    batch = episodes(tasks=2, shots=2, queries=2)
    algo = algorithm(name, "inductive")
    before = running_stats(algo.model)
    assert before, "an inductive model keeps running statistics"
    algo.meta_train_step(train_batch(algo, batch))
    after = running_stats(algo.model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "running_mean" in n)
    assert set(before) <= set(algo.state_dict()["model"])  # checkpointed with the weights

    # Each query alone: scoring the first half of the queries gives the same logits as scoring them all.
    whole = algo.predict(batch)
    half = batch.query.shape[1] // 2
    part = algo.predict(batch._replace(query=batch.query[:, :half], query_labels=batch.query_labels[:, :half]))
    assert torch.allclose(part, whole[:, :half], atol=1e-9)
    assert torch.equal(running_stats(algo.model)["features.0.1.running_mean"], after["features.0.1.running_mean"])


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_transductive_predictions_depend_on_the_other_queries(name):
    batch = episodes(tasks=2, shots=2, queries=2)
    algo = algorithm(name, "transductive")
    assert not running_stats(algo.model)
    whole = algo.predict(batch)
    part = algo.predict(batch._replace(query=batch.query[:, :1], query_labels=batch.query_labels[:, :1]))
    assert not torch.allclose(part, whole[:, :1], atol=1e-6)


def test_maml_running_statistics_do_not_depend_on_threads_or_recomputation():
    batch = episodes(tasks=4, shots=2, queries=2)
    results = []
    for workers, checkpointed in [(1, False), (2, False), (1, True)]:
        algo = algorithm("maml", "inductive", f"algo.checkpoint_inner={str(checkpointed).lower()}")
        algo._threads.__init__(algo.model, workers)
        grads = algo.meta_gradients(batch)
        algo.meta_train_step(batch)
        results.append((grads, running_stats(algo.model)))
    (grads, stats), others = results[0], results[1:]
    for other_grads, other_stats in others:
        for n in grads:
            assert torch.allclose(grads[n], other_grads[n], atol=1e-10), n
        for n in stats:  # one task after another, each inner step and query pass once, in task order
            assert torch.allclose(stats[n], other_stats[n], atol=1e-12), n


def test_maml_inductive_refuses_vmap_and_auto_takes_the_loop():
    with pytest.raises(MetalearnError, match="model.bn=inductive.*algo.vectorize=loop"):
        algorithm("maml", "inductive", "algo.vectorize=vmap")
    # auto picks vmap on CUDA (metalearn.algorithms.batching.resolve_vectorize), but not here
    assert loop_only(Vectorize.auto, "why") is False
    assert loop_only(Vectorize.loop, "why") is False


def test_the_backbones_name_their_mode():
    assert Conv4(WAYS, hidden=4).batch_norm == "transductive"
    assert Conv4(WAYS, hidden=4, bn="inductive").batch_norm == "inductive"
    with pytest.raises(ValueError):
        Conv4(WAYS, hidden=4, bn="both")


def test_a_checkpoint_of_the_other_mode_is_refused_with_the_mode_to_use():
    inductive = algorithm("protonet", "inductive")
    with pytest.raises(MetalearnError, match="trained with model.bn=inductive.*use model.bn=inductive"):
        algorithm("protonet", "transductive").load_state_dict(inductive.state_dict())
    with pytest.raises(MetalearnError, match="trained with model.bn=transductive"):
        inductive.load_state_dict(algorithm("protonet", "transductive").state_dict())
