"""MAML meta-gradients against a naive autograd loop, in float64, with BatchNorm."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.algorithms.batching import Vectorize, resolve_vectorize
from metalearn.algorithms.maml import MAML
from metalearn.data import ClassSplit, EpisodeSampler
from metalearn.errors import MetalearnError
from metalearn.models import Conv4

WAYS = 3


def episodes(tasks=3, shots=2, queries=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    split = ClassSplit(
        torch.randint(0, 256, (6 * 8, 1, 28, 28), generator=g, dtype=torch.uint8),
        torch.arange(6).repeat_interleave(8),
        "random",
    )
    return EpisodeSampler(split, WAYS, shots, queries, "cpu", seed=0, dtype=dtype).sample(tasks)


def model64(seed=0):
    torch.manual_seed(seed)
    return Conv4(WAYS, hidden=4).double()


def support_loss(logits, labels, inner_loss="mean"):
    """The inner loss by hand: the mean cross-entropy, or Finn et al.'s sum of per-example losses over the shots."""
    per_example = -logits.log_softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
    if inner_loss == "mean":
        return per_example.sum() / len(labels)
    return per_example.sum() / (len(labels) // WAYS)


def naive_meta_gradient(model, batch, inner_lr, inner_steps, first_order, inner_loss="mean"):
    """The textbook loop: per task, unrolled SGD with create_graph, mean over tasks."""
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in start]
    for sx, sy, qx, qy in zip(*batch, strict=False):
        fast = list(start)
        for _ in range(inner_steps):
            loss = support_loss(functional_call(model, dict(zip(names, fast, strict=False)), (sx,)), sy, inner_loss)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - inner_lr * g for w, g in zip(fast, grads, strict=False)]
        if first_order:
            fast = [w.detach().requires_grad_() for w in fast]
        query_loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=False)), (qx,)), qy)
        grads = torch.autograd.grad(query_loss, fast if first_order else start)
        total = [t + g / len(batch.support) for t, g in zip(total, grads, strict=False)]
    return dict(zip(names, total, strict=False))


@pytest.mark.parametrize("inner_loss", ["mean", "sum_over_shots"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_meta_gradients_match_naive_loop(first_order, vectorize, inner_loss):
    model = model64()
    batch = episodes()
    algo = MAML(
        model,
        inner_lr=0.3,
        inner_steps=2,
        inner_steps_eval=2,
        outer_lr=1e-3,
        first_order=first_order,
        vectorize=vectorize,
        inner_loss=inner_loss,
    )
    got = algo.meta_gradients(batch)
    expected = naive_meta_gradient(model, batch, 0.3, 2, first_order, inner_loss)
    assert got.keys() == expected.keys()
    # Relative to the largest gradient entry: conv biases ahead of BatchNorm have
    # exactly-zero gradients, so their own scale is rounding noise.
    scale = max(g.abs().max() for g in expected.values())
    for name in expected:
        assert (got[name] - expected[name]).abs().max() / scale < 1e-10, name
    assert any(g.abs().sum() > 0 for g in got.values())


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_sum_over_shots_inner_step_by_hand(vectorize):
    """One inner step on Finn et al.'s loss: theta - alpha * d/dtheta [sum_i CE_i / shots], which is the
    mean loss's step taken ways times larger (3-way, 2 shots here)."""
    model, batch = model64(), episodes(tasks=2, shots=2)
    algo = MAML(
        model,
        inner_lr=0.05,
        inner_steps=1,
        inner_steps_eval=1,
        outer_lr=1e-3,
        first_order=False,
        vectorize=vectorize,
        inner_loss="sum_over_shots",
    )
    got = algo.predict(batch)
    names = [n for n, _ in model.named_parameters()]
    for task, (sx, sy, qx, _) in enumerate(zip(*batch, strict=False)):
        theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
        logits = functional_call(model, dict(zip(names, theta, strict=False)), (sx,))
        terms = [-torch.log_softmax(logits[i], dim=0)[sy[i]] for i in range(len(sy))]
        grads = torch.autograd.grad(sum(terms) / 2, theta)
        adapted = dict(zip(names, [t - 0.05 * g for t, g in zip(theta, grads, strict=False)], strict=False))
        assert torch.allclose(got[task], functional_call(model, adapted, (qx,)), rtol=1e-9, atol=1e-12)
    mean_loss = MAML(
        model,
        inner_lr=0.05 * WAYS,
        inner_steps=1,
        inner_steps_eval=1,
        outer_lr=1e-3,
        first_order=False,
        vectorize=vectorize,
    ).predict(batch)
    assert torch.allclose(got, mean_loss, rtol=1e-9, atol=1e-12)


def test_second_and_first_order_differ():
    model, batch = model64(), episodes()
    kwargs = dict(inner_lr=0.3, inner_steps=2, inner_steps_eval=2, outer_lr=1e-3, vectorize=False)
    second = MAML(model, first_order=False, **kwargs).meta_gradients(batch)
    first = MAML(model, first_order=True, **kwargs).meta_gradients(batch)
    assert max((second[n] - first[n]).abs().max() for n in second) > 1e-6


def test_predict_is_the_same_looped_or_vectorised():
    model, batch = model64(), episodes()
    kwargs = dict(inner_lr=0.3, inner_steps=1, inner_steps_eval=3, outer_lr=1e-3, first_order=False)
    looped = MAML(model, vectorize=False, **kwargs).predict(batch)
    vmapped = MAML(model, vectorize=True, **kwargs).predict(batch)
    assert looped.shape == (3, WAYS * 2, WAYS)
    assert torch.allclose(looped, vmapped, rtol=1e-9, atol=1e-12)


def test_predict_adapts_with_inner_steps_eval():
    """Adapting on the support set as the query set must fit it better with more steps."""
    model, batch = model64(), episodes(queries=2)
    same = batch._replace(query=batch.support, query_labels=batch.support_labels)
    losses = []
    for steps in (1, 5):
        algo = MAML(
            model,
            inner_lr=0.3,
            inner_steps=1,
            inner_steps_eval=steps,
            outer_lr=1e-3,
            first_order=False,
            vectorize=False,
        )
        logits = algo.predict(same)
        losses.append(F.cross_entropy(logits.flatten(0, 1), same.query_labels.flatten()).item())
    assert losses[1] < losses[0]


def test_meta_train_step_updates_weights_and_reports_metrics():
    model = Conv4(WAYS, hidden=4)
    algo = MAML(
        model, inner_lr=0.4, inner_steps=1, inner_steps_eval=1, outer_lr=1e-2, first_order=False, vectorize=False
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = algo.meta_train_step(episodes(dtype=torch.float32))
    assert set(out) >= {"loss", "accuracy"} and 0 <= out["accuracy"] <= 1 and out["loss"] > 0
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_state_round_trip_restores_model_and_optimizer():
    batch = episodes(dtype=torch.float32)
    make = lambda: MAML(Conv4(WAYS, hidden=4), 0.4, 1, 1, 1e-2, False, False)  # noqa: E731
    torch.manual_seed(0)
    a = make()
    a.meta_train_step(batch)
    torch.manual_seed(1)
    b = make()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    a.meta_train_step(batch)
    b.meta_train_step(batch)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=False):
        assert torch.equal(pa, pb), name


def test_auto_strategy_is_vmap_on_cuda_and_loop_on_cpu():
    assert resolve_vectorize(Vectorize.auto, torch.device("cuda")) is True
    assert resolve_vectorize(Vectorize.auto, torch.device("cpu")) is False
    assert resolve_vectorize("vmap", torch.device("cpu")) is True
    assert resolve_vectorize("loop", torch.device("cuda")) is False


@pytest.mark.parametrize(
    "variant",
    [{}, {"adapt": "head"}, {"learn_inner_lr": True}],
    ids=["maml", "anil", "meta-sgd"],
)
def test_checkpointed_inner_steps_give_the_plain_second_order_meta_gradient(variant):
    """algo.checkpoint_inner recomputes the inner steps in the backward pass: the same numbers, less memory."""
    batch = episodes()

    def meta_gradients(checkpoint_inner):
        torch.manual_seed(1)  # Meta-SGD's initial rates
        algo = MAML(
            model64(),
            inner_lr=0.3,
            inner_steps=3,
            inner_steps_eval=2,
            outer_lr=1e-3,
            first_order=False,
            vectorize=False,
            checkpoint_inner=checkpoint_inner,
            **variant,
        )
        return algo.meta_gradients(batch)

    plain, checkpointed = meta_gradients(False), meta_gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-10), name


def test_checkpointed_inner_steps_refuse_vmap_with_the_way_out():
    with pytest.raises(MetalearnError, match="add algo.vectorize=loop"):
        MAML(model64(), 0.3, 1, 1, 1e-3, first_order=False, vectorize=True, checkpoint_inner=True)
