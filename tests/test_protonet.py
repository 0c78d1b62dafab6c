"""Prototypical Networks against a naive hand-written reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import WAYS, assert_dicts_close, episodes, params_of, tiny

from metalearn.algorithms.protonet import ProtoNet, prototype_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # tensors this small run fastest on one thread


def naive_prototype_logits(support, labels, query, ways):
    """-||q - mean of class c||^2 with plain Python loops."""
    prototypes = []
    for c in range(ways):
        members = [support[i] for i in range(len(labels)) if int(labels[i]) == c]
        total = members[0]
        for m in members[1:]:
            total = total + m
        prototypes.append(total / len(members))
    rows = []
    for q in query:
        rows.append(torch.stack([-sum((q[d] - p[d]) ** 2 for d in range(len(q))) for p in prototypes]))
    return torch.stack(rows)


def test_prototype_logits_are_negative_squared_distances_to_class_means():
    """Uneven class sizes in any order: logits are -squared distances to each class's mean."""
    g = torch.Generator().manual_seed(0)
    support = torch.randn(9, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2, 3, 0, 2, 1, 3])
    query = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = prototype_logits(support, labels, query, 4)
    assert got.shape == (4, 4)
    assert torch.allclose(got, naive_prototype_logits(support, labels, query, 4), rtol=1e-12, atol=1e-12)


def naive_protonet_loss(model, batch, ways):
    """Mean over tasks of the query cross-entropy; support and query embedded as one batch."""
    total = 0
    for sx, sy, qx, qy in zip(*batch, strict=False):
        embedded = model(torch.cat([sx, qx]))
        logits = naive_prototype_logits(embedded[: len(sx)], sy, embedded[len(sx) :], ways)
        total = total + F.cross_entropy(logits, qy)
    return total / len(batch.support)


def protonet(model, vectorize=False, lr=1e-2, workers=1):
    return ProtoNet(model, outer_lr=lr, lr_decay=0.5, lr_decay_every=2, vectorize=vectorize, workers=workers)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_protonet_step_applies_the_naive_gradient(vectorize):
    """meta_train_step hands Adam the gradient of the naive mean query loss, and its weights follow."""
    model, batch = tiny(num_classes=0), episodes(tasks=2, shots=2, queries=2, ways=4)
    reference = copy.deepcopy(model)
    algo = protonet(model, vectorize)
    captured = {}
    algo.optimizer.register_step_pre_hook(
        lambda *_: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
    )
    with torch.no_grad():
        expected_loss = naive_protonet_loss(reference, batch, 4).item()
    out = algo.meta_train_step(batch)
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-10)

    loss = naive_protonet_loss(reference, batch, 4)
    names = [n for n, _ in reference.named_parameters()]
    expected = dict(zip(names, torch.autograd.grad(loss, list(reference.parameters())), strict=False))
    assert_dicts_close(captured, expected, 1e-10)

    for p, g in zip(reference.parameters(), expected.values(), strict=False):
        p.grad = g
    torch.optim.Adam(reference.parameters(), lr=1e-2).step()
    assert_dicts_close(params_of(model), params_of(reference), 1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_protonet_learning_rate_decays_stepwise():
    """The outer rate is multiplied by lr_decay every lr_decay_every steps."""
    model, batch = tiny(num_classes=0), episodes(tasks=1, ways=WAYS)
    algo = protonet(model, lr=1e-2)
    rates = []
    for _ in range(5):
        algo.meta_train_step(batch)
        rates.append(algo.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3])


def test_protonet_loop_and_vmap_agree_and_predict_shape():
    """Both strategies, and the loop on two task threads, train and predict alike; predict gives
    [T, ways*queries, ways] naive logits."""
    batch = episodes(tasks=3, shots=2, queries=3, ways=WAYS)
    results = []
    for vectorize, workers in ((False, 1), (True, 1), (False, 2)):
        model = tiny(num_classes=0)
        algo = protonet(model, vectorize, workers=workers)
        algo.meta_train_step(batch)
        results.append((model, params_of(model), algo.predict(batch)))
    logits = results[0][2]
    assert logits.shape == (3, WAYS * 3, WAYS)
    for other in results[1:]:
        assert_dicts_close(other[1], results[0][1], 1e-10)
        assert torch.allclose(other[2], logits, rtol=1e-9, atol=1e-10)
    model = results[0][0].eval()
    with torch.no_grad():
        expected = []
        for sx, sy, qx in zip(batch.support, batch.support_labels, batch.query, strict=False):
            embedded = model(torch.cat([sx, qx]))
            expected.append(naive_prototype_logits(embedded[: len(sx)], sy, embedded[len(sx) :], WAYS))
    assert torch.allclose(logits, torch.stack(expected), rtol=1e-9, atol=1e-10)
