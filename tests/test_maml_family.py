"""Meta-SGD and ANIL against naive hand-written references, and the MAML family's task threads."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import assert_dicts_close, episodes, mean_over_tasks, params_of, tiny
from torch.func import functional_call

from metalearn.algorithms.maml import MAML

pytestmark = pytest.mark.usefixtures("one_thread")  # tensors this small run fastest on one thread


# --- Meta-SGD -----------------------------------------------------------------


def naive_metasgd_gradients(model, rates, batch, steps):
    """Per task phi = theta - alpha * grad L_support(theta) (unrolled, create_graph); d L_query / d(theta, alpha)."""
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alphas = [rates[n].detach().clone().requires_grad_() for n in names]
    per_task = []
    for sx, sy, qx, qy in zip(*batch, strict=False):
        fast = list(start)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=False)), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - a * g for w, a, g in zip(fast, alphas, grads, strict=False)]
        query_loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=False)), (qx,)), qy)
        grads = torch.autograd.grad(query_loss, start + alphas)
        per_task.append(dict(zip(names + ["inner_lr." + n for n in names], grads, strict=False)))
    return mean_over_tasks(per_task)


def metasgd(model, vectorize=False, steps=1, outer_lr=1e-2):
    return MAML(
        model,
        inner_lr=123.0,
        inner_steps=steps,
        inner_steps_eval=steps,
        outer_lr=outer_lr,
        first_order=False,
        vectorize=vectorize,
        learn_inner_lr=True,
        inner_lr_init=(0.05, 0.3),
    )


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_metasgd_rate_gradients_match_naive_autograd(vectorize, steps):
    """The per-weight inner rates (and the initialisation) get the meta-gradient of the naive
    Meta-SGD computation; every rate's gradient is non-zero, and inner_lr itself is unused."""
    model, batch = tiny(), episodes()
    algo = metasgd(model, vectorize, steps)
    assert set(algo.rates) == {n for n, _ in model.named_parameters()}
    assert all(low >= 0.05 and high <= 0.3 for low, high in ((r.min(), r.max()) for r in algo.rates.values()))
    got = algo.meta_gradients(batch)
    expected = naive_metasgd_gradients(model, algo.rates, batch, steps)
    assert_dicts_close(got, expected, 1e-10)
    for name, g in got.items():
        if name.startswith("inner_lr."):
            assert g.abs().max() > 1e-8, name


def test_metasgd_step_updates_rates_with_their_meta_gradient():
    """A training step moves every rate by Adam's first step on its meta-gradient: -lr g / (|g| + eps)."""
    model, batch = tiny(), episodes()
    algo = metasgd(model, outer_lr=1e-2)
    before = {n: r.detach().clone() for n, r in algo.rates.items()}
    grads = naive_metasgd_gradients(model, before, batch, 1)
    algo.meta_train_step(batch)
    for name, r in algo.rates.items():
        g = grads["inner_lr." + name]
        assert not torch.equal(r, before[name]), name
        assert torch.allclose(r, before[name] - 1e-2 * g / (g.abs() + 1e-8), rtol=0, atol=1e-9), name
        assert r.grad is None


def test_metasgd_predict_uses_the_learned_rates():
    """predict adapts with phi = theta - alpha * grad L_support, alpha the learned rates."""
    model, batch = tiny(), episodes()
    algo = metasgd(model)
    names = [n for n, _ in model.named_parameters()]
    expected = []
    for sx, sy, qx in zip(batch.support, batch.support_labels, batch.query, strict=False):
        fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=False)), (sx,)), sy)
        grads = torch.autograd.grad(loss, fast)
        fast = {n: w.detach() - algo.rates[n].detach() * g for n, w, g in zip(names, fast, grads, strict=False)}
        expected.append(functional_call(model, fast, (qx,)))
    assert torch.allclose(algo.predict(batch), torch.stack(expected), rtol=1e-9, atol=1e-12)


def test_metasgd_rates_round_trip_through_state_dict():
    """The rates are saved in state_dict and restored, with their optimizer state, so training resumes identically."""
    batch = episodes()
    a = metasgd(tiny(seed=0))
    a.meta_train_step(batch)
    b = metasgd(tiny(seed=1))
    assert any(not torch.equal(a.rates[n], b.rates[n]) for n in a.rates)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["inner_lr"]) == set(a.rates)
    b.load_state_dict(state)
    for n in a.rates:
        assert torch.equal(a.rates[n], b.rates[n]), n
    a.meta_train_step(batch)
    b.meta_train_step(batch)
    for n in a.rates:
        assert torch.equal(a.rates[n], b.rates[n]), n
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=False):
        assert torch.equal(pa, pb), n


# --- ANIL ---------------------------------------------------------------------


def naive_anil_gradients(model, batch, inner_lr, steps, first_order):
    """Per task: body features of support and query, only the head (W, b) adapted by unrolled SGD;
    gradient of the query loss w.r.t. all initial weights, mean over tasks."""
    names = [n for n, _ in model.named_parameters()]
    start = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    body = {n[len("features.") :]: p for n, p in start.items() if n.startswith("features.")}
    per_task = []
    for sx, sy, qx, qy in zip(*batch, strict=False):
        support_features = functional_call(model.features, body, (sx,))
        w, b = start["head.weight"], start["head.bias"]
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(support_features, w, b), sy)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=not first_order)
            w, b = w - inner_lr * gw, b - inner_lr * gb
        if first_order:
            w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
        query_loss = F.cross_entropy(F.linear(functional_call(model.features, body, (qx,)), w, b), qy)
        wrt = [start[n] for n in names if n.startswith("features.")] + (
            [w, b] if first_order else [start["head.weight"], start["head.bias"]]
        )
        grads = torch.autograd.grad(query_loss, wrt)
        per_task.append(
            dict(
                zip([n for n in names if n.startswith("features.")] + ["head.weight", "head.bias"], grads, strict=False)
            )
        )
    return mean_over_tasks(per_task)


def anil(model, first_order=False, vectorize=False, steps=2):
    return MAML(
        model,
        inner_lr=0.5,
        inner_steps=steps,
        inner_steps_eval=steps,
        outer_lr=1e-3,
        first_order=first_order,
        vectorize=vectorize,
        adapt="head",
    )


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_anil_meta_gradients_match_naive_head_only_loop(vectorize):
    """Second-order ANIL equals the naive loop adapting only the head, the body differentiated
    through both the query features and the support features the head was fitted on."""
    model, batch = tiny(), episodes()
    algo = anil(model, vectorize=vectorize)
    assert algo.adapted_names == ["head.weight", "head.bias"]
    got = algo.meta_gradients(batch)
    assert_dicts_close(got, naive_anil_gradients(model, batch, 0.5, 2, first_order=False), 1e-10)
    assert all(g.abs().max() > 0 for g in got.values())


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_first_order_anil_body_gradient_is_the_outer_loss_gradient(vectorize):
    """First-order ANIL: the body's gradient is that of the query loss at the adapted head only
    (no path through the inner loop), which differs from the second-order one."""
    model, batch = tiny(), episodes()
    got = anil(model, first_order=True, vectorize=vectorize).meta_gradients(batch)
    expected = naive_anil_gradients(model, batch, 0.5, 2, first_order=True)
    assert_dicts_close(got, expected, 1e-10)
    second = naive_anil_gradients(model, batch, 0.5, 2, first_order=False)
    assert max((second[n] - got[n]).abs().max() for n in got if n.startswith("features.")) > 1e-6


def test_anil_predict_adapts_only_the_head():
    """predict keeps the body's weights and takes inner_steps_eval SGD steps on the head alone."""
    model, batch = tiny(), episodes()
    algo = MAML(
        model,
        inner_lr=0.5,
        inner_steps=1,
        inner_steps_eval=3,
        outer_lr=1e-3,
        first_order=False,
        vectorize=False,
        adapt="head",
    )
    expected = []
    with torch.no_grad():
        for sx, sy, qx in zip(batch.support, batch.support_labels, batch.query, strict=False):
            head = copy.deepcopy(model.head)
            opt = torch.optim.SGD(head.parameters(), lr=0.5)
            features = model.features(sx)
            for _ in range(3):
                opt.zero_grad()
                with torch.enable_grad():
                    F.cross_entropy(head(features), sy).backward()
                opt.step()
            expected.append(head(model.features(qx)))
    assert torch.allclose(algo.predict(batch), torch.stack(expected), rtol=1e-9, atol=1e-12)


# --- the MAML family's task threads ---------------------------------------------


@pytest.mark.parametrize("variant", ["maml", "fomaml", "anil", "metasgd"])
def test_task_threads_give_the_one_thread_loop_results(variant):
    """Splitting the meta-batch over two worker threads (the CPU default) changes neither the
    meta-gradients nor a training step, for every member of the MAML family."""
    batch = episodes(tasks=5)
    kwargs = {
        "maml": {},
        "fomaml": {"first_order": True},
        "anil": {"adapt": "head"},
        "metasgd": {"learn_inner_lr": True},
    }[variant]

    def build(workers):
        torch.manual_seed(1)
        return MAML(
            tiny(),
            inner_lr=0.5,
            inner_steps=2,
            inner_steps_eval=2,
            outer_lr=1e-2,
            vectorize=False,
            workers=workers,
            **{"first_order": False, **kwargs},
        )

    one, two = build(1), build(2)
    assert len(two._threads.replicas) == 2
    assert_dicts_close(two.meta_gradients(batch), one.meta_gradients(batch), 1e-12)
    assert one.meta_train_step(batch) == pytest.approx(two.meta_train_step(batch), rel=1e-12)
    assert_dicts_close(params_of(two.model), params_of(one.model), 1e-12)
    assert torch.get_num_threads() == 1  # the workers' one-thread setting is undone
