"""Reptile, Meta-SGD, ANIL, ProtoNet, finetune and distill against naive hand-written references.

Each reference is plain autograd / torch.optim code written independently of
the algorithm under test, in float64 where the comparison is exact.
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.finetune import Distill, Finetune
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.protonet import ProtoNet, prototype_logits
from metalearn.algorithms.reptile import Reptile
from metalearn.data import ClassSplit, EpisodeSampler, LabelledImages
from metalearn.errors import MetalearnError

WAYS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small run fastest on one thread; a second one only contends for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool twice, then a linear head (identity with num_classes=0); 28x28 -> `hidden`."""

    def __init__(self, num_classes: int, hidden: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, hidden, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(7),
            nn.Flatten(),
        )
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.head(self.features(x))


def tiny(num_classes=WAYS, seed=0, dtype=torch.float64, hidden=4):
    torch.manual_seed(seed)
    return TinyNet(num_classes, hidden).to(dtype)


def episodes(tasks=3, shots=2, queries=2, ways=WAYS, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    split = ClassSplit(
        torch.randint(0, 256, (6 * 8, 1, 28, 28), generator=g, dtype=torch.uint8),
        torch.arange(6).repeat_interleave(8),
        "random",
    )
    return EpisodeSampler(split, ways, shots, queries, "cpu", seed=seed, dtype=dtype).sample(tasks)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_dicts_close(got, expected, tol=1e-10):
    """Equal up to `tol` relative to the largest entry of `expected`."""
    assert got.keys() == expected.keys()
    scale = max(v.abs().max() for v in expected.values())
    for name in expected:
        assert (got[name] - expected[name]).abs().max() / scale < tol, name


def mean_over_tasks(per_task):
    return {n: torch.stack([g[n] for g in per_task]).mean(dim=0) for n in per_task[0]}


# --- Reptile ------------------------------------------------------------------


def naive_reptile(model, batch, seed, lr, steps, batch_size, optimizer, eps):
    """theta + eps * (mean_i phi_i - theta), phi_i from torch.optim on a copy of the model per task.

    The minibatches walk through fresh permutations of each task's images, one
    per pass, drawn from torch's global RNG seeded with `seed` (argsort of
    uniform keys [tasks, passes, images]).
    """
    theta = params_of(model)
    num_tasks, size = batch.support.shape[:2]
    torch.manual_seed(seed)
    passes = math.ceil(steps * batch_size / size)
    orders = torch.rand(num_tasks, passes, size).argsort(dim=2).flatten(1).tolist()
    adapted = []
    for x, y, order in zip(batch.support, batch.support_labels, orders):
        task_model = copy.deepcopy(model).train()
        if optimizer == "adam":
            opt = torch.optim.Adam(task_model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        else:
            opt = torch.optim.SGD(task_model.parameters(), lr=lr)
        stream = iter(order)
        for _ in range(steps):
            picks = [next(stream) for _ in range(batch_size)]
            loss = F.cross_entropy(task_model(x[picks]), y[picks])
            opt.zero_grad()
            loss.backward()
            opt.step()
        adapted.append(params_of(task_model))
    phi = mean_over_tasks(adapted)
    return {n: theta[n] + eps * (phi[n] - theta[n]) for n in theta}


def reptile(
    model,
    optimizer="sgd",
    vectorize=False,
    outer_lr=0.7,
    outer_lr_final=0.0,
    total_steps=10,
    inner_lr=0.05,
    inner_steps=3,
    inner_batch=4,
):
    return Reptile(
        model,
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        inner_batch=inner_batch,
        inner_optimizer=optimizer,
        inner_steps_eval=4,
        inner_batch_eval=4,
        outer_lr=outer_lr,
        outer_lr_final=outer_lr_final,
        anneal_steps=None,
        train_steps=total_steps,
        vectorize=vectorize,
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_reptile_step_moves_weights_toward_naive_adapted_weights(optimizer, vectorize):
    """One outer step equals theta + eps (mean phi - theta) with phi from a per-task torch.optim loop
    (Adam with beta1=0 or SGD) whose minibatches run on into a reshuffled second pass."""
    model, batch = tiny(), episodes(shots=3, queries=1)  # 9 images, 3 steps of 4: a second pass
    lr = 0.01 if optimizer == "adam" else 0.1
    algo = reptile(model, optimizer, vectorize, inner_lr=lr)
    expected = naive_reptile(model, batch, 7, lr, 3, 4, optimizer, eps=0.7)
    torch.manual_seed(7)
    out = algo.meta_train_step(batch)
    assert set(out) >= {"loss", "accuracy"} and out["loss"] > 0 and 0 <= out["accuracy"] <= 1
    got = params_of(model)
    assert_dicts_close(got, expected, 1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_reptile_outer_step_size_anneals_linearly():
    """Step k interpolates with eps_k = outer_lr + (final - outer_lr) * min(k / total_steps, 1)."""
    model, batch = tiny(), episodes(tasks=2, shots=2, queries=1)
    algo = reptile(model, outer_lr=0.9, outer_lr_final=0.1, total_steps=3, inner_steps=2, inner_batch=3)
    for k, eps in enumerate([0.9, 0.9 - 0.8 / 3, 0.9 - 1.6 / 3, 0.1, 0.1]):
        expected = naive_reptile(model, batch, k, 0.05, 2, 3, "sgd", eps)
        torch.manual_seed(k)
        algo.meta_train_step(batch)
        assert_dicts_close(params_of(model), expected, 1e-10)
    assert algo.state_dict()["step"] == 5


def test_reptile_resumes_the_anneal_from_its_state():
    """A restored step count sets eps: loading step=2 of 4 gives eps halfway."""
    model, batch = tiny(), episodes(tasks=2, shots=2, queries=1)
    algo = reptile(model, outer_lr=1.0, outer_lr_final=0.0, total_steps=4, inner_steps=1)
    algo.load_state_dict({"model": model.state_dict(), "step": 2})
    expected = naive_reptile(model, batch, 3, 0.05, 1, 4, "sgd", eps=0.5)
    torch.manual_seed(3)
    algo.meta_train_step(batch)
    assert_dicts_close(params_of(model), expected, 1e-10)


def test_reptile_schedule_is_the_one_the_run_started_with():
    """Resumed with a longer train.steps, eps follows the saved schedule (4 steps), not the new length."""
    model = tiny()
    started = reptile(model, outer_lr=1.0, outer_lr_final=0.2, total_steps=4, inner_steps=1)
    state = {**started.state_dict(), "step": 2}
    longer = reptile(model, outer_lr=1.0, outer_lr_final=0.2, total_steps=40, inner_steps=1)
    longer.load_state_dict(state)
    assert longer.anneal_steps == 4 and longer.outer_step_size() == pytest.approx(0.6)
    longer.check_resume(40)  # eps goes on at 0.2 after step 4: allowed
    with_zero = reptile(model, outer_lr=1.0, outer_lr_final=0.0, total_steps=40, inner_steps=1)
    with_zero.load_state_dict({**state, "anneal_steps": 4})
    with pytest.raises(MetalearnError, match=r"algo.anneal_steps=40 .*eps jumps from 0.5 to 0.95"):
        with_zero.check_resume(40)
    with_zero.check_resume(4)


def test_reptile_anneal_steps_given_on_resume_replaces_the_saved_schedule(caplog):
    model = tiny()
    algo = Reptile(
        model,
        inner_lr=0.05,
        inner_steps=1,
        inner_batch=4,
        inner_optimizer="sgd",
        inner_steps_eval=1,
        inner_batch_eval=4,
        outer_lr=1.0,
        outer_lr_final=0.0,
        anneal_steps=8,
        train_steps=8,
        vectorize=False,
    )
    with caplog.at_level("WARNING"):
        algo.load_state_dict({"model": model.state_dict(), "step": 2, "anneal_steps": 4})
    assert algo.anneal_steps == 8 and algo.outer_step_size() == pytest.approx(0.75)
    assert "jumps from 0.5 to 0.75" in caplog.text


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_reptile_loop_and_vmap_agree(optimizer):
    """The looped and vmapped strategies give the same training step and the same predictions."""
    batch = episodes(shots=3, queries=2)
    results = []
    for vectorize in (False, True):
        model = tiny()
        algo = reptile(model, optimizer, vectorize, inner_lr=0.01)
        torch.manual_seed(1)
        algo.meta_train_step(batch)
        results.append((params_of(model), algo.predict(batch)))
    assert_dicts_close(results[1][0], results[0][0], 1e-10)
    assert results[0][1].shape == (3, WAYS * 2, WAYS)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


def test_reptile_predict_fine_tunes_like_the_naive_loop_without_touching_the_rng():
    """predict fine-tunes each task on its support set (fixed order, seed 0 generator) and leaves
    torch's global RNG as it was."""
    model, batch = tiny(), episodes(shots=3, queries=2)
    algo = reptile(model, inner_lr=0.1)
    orders = torch.rand(3, 2, 9, generator=torch.Generator().manual_seed(0)).argsort(dim=2).flatten(1).tolist()
    expected = []
    for sx, sy, qx, order in zip(batch.support, batch.support_labels, batch.query, orders):
        task_model = copy.deepcopy(model).train()
        opt = torch.optim.SGD(task_model.parameters(), lr=0.1)
        stream = iter(order)
        for _ in range(4):
            picks = [next(stream) for _ in range(4)]
            opt.zero_grad()
            F.cross_entropy(task_model(sx[picks]), sy[picks]).backward()
            opt.step()
        with torch.no_grad():
            expected.append(task_model(qx))
    torch.manual_seed(11)
    state = torch.get_rng_state()
    before = params_of(model)
    got = algo.predict(batch)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(got, torch.stack(expected), rtol=1e-9, atol=1e-11)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# --- Meta-SGD -----------------------------------------------------------------


def naive_metasgd_gradients(model, rates, batch, steps):
    """Per task phi = theta - alpha * grad L_support(theta) (unrolled, create_graph); d L_query / d(theta, alpha)."""
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alphas = [rates[n].detach().clone().requires_grad_() for n in names]
    per_task = []
    for sx, sy, qx, qy in zip(*batch):
        fast = list(start)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - a * g for w, a, g in zip(fast, alphas, grads)]
        query_loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (qx,)), qy)
        grads = torch.autograd.grad(query_loss, start + alphas)
        per_task.append(dict(zip(names + ["inner_lr." + n for n in names], grads)))
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
    for sx, sy, qx in zip(batch.support, batch.support_labels, batch.query):
        fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (sx,)), sy)
        grads = torch.autograd.grad(loss, fast)
        fast = {n: w.detach() - algo.rates[n].detach() * g for n, w, g in zip(names, fast, grads)}
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
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), n


# --- ANIL ---------------------------------------------------------------------


def naive_anil_gradients(model, batch, inner_lr, steps, first_order):
    """Per task: body features of support and query, only the head (W, b) adapted by unrolled SGD;
    gradient of the query loss w.r.t. all initial weights, mean over tasks."""
    names = [n for n, _ in model.named_parameters()]
    start = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    body = {n[len("features.") :]: p for n, p in start.items() if n.startswith("features.")}
    per_task = []
    for sx, sy, qx, qy in zip(*batch):
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
            dict(zip([n for n in names if n.startswith("features.")] + ["head.weight", "head.bias"], grads))
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
        head_only=True,
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
        head_only=True,
    )
    expected = []
    with torch.no_grad():
        for sx, sy, qx in zip(batch.support, batch.support_labels, batch.query):
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


# --- ProtoNet -----------------------------------------------------------------


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
    for sx, sy, qx, qy in zip(*batch):
        embedded = model(torch.cat([sx, qx]))
        logits = naive_prototype_logits(embedded[: len(sx)], sy, embedded[len(sx) :], ways)
        total = total + F.cross_entropy(logits, qy)
    return total / len(batch.support)


def protonet(model, vectorize=False, lr=1e-2):
    return ProtoNet(model, outer_lr=lr, lr_decay=0.5, lr_decay_every=2, vectorize=vectorize)


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
    expected = dict(zip(names, torch.autograd.grad(loss, list(reference.parameters()))))
    assert_dicts_close(captured, expected, 1e-10)

    for p, g in zip(reference.parameters(), expected.values()):
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
    """Both strategies train and predict alike; predict gives [T, ways*queries, ways] naive logits."""
    batch = episodes(tasks=3, shots=2, queries=3, ways=WAYS)
    results = []
    for vectorize in (False, True):
        model = tiny(num_classes=0)
        algo = protonet(model, vectorize)
        algo.meta_train_step(batch)
        results.append((model, params_of(model), algo.predict(batch)))
    assert_dicts_close(results[1][1], results[0][1], 1e-10)
    logits = results[0][2]
    assert logits.shape == (3, WAYS * 3, WAYS)
    assert torch.allclose(results[1][2], logits, rtol=1e-9, atol=1e-10)
    model = results[0][0].eval()
    with torch.no_grad():
        expected = []
        for sx, sy, qx in zip(batch.support, batch.support_labels, batch.query):
            embedded = model(torch.cat([sx, qx]))
            expected.append(naive_prototype_logits(embedded[: len(sx)], sy, embedded[len(sx) :], WAYS))
    assert torch.allclose(logits, torch.stack(expected), rtol=1e-9, atol=1e-10)


# --- finetune and distill ------------------------------------------------------

HEAD = dict(head_lr=0.01, head_momentum=0.9, head_dampening=0.9, head_weight_decay=1e-3, head_steps=100)


def finetune(model, **overrides):
    return Finetune(model, outer_lr=1e-3, batch_size=8, **{**HEAD, **overrides})


def naive_heads(support, labels, ways, steps=100):
    """One nn.Linear per task, zero-initialised, fitted with torch.optim.SGD at the finetune settings."""
    heads = []
    for x, y in zip(support, labels):
        head = nn.Linear(x.shape[-1], ways).to(x.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(x), y).backward()
            opt.step()
        heads.append(head)
    return heads


def test_fit_heads_separates_support_and_matches_per_task_sgd():
    """Batched heads equal per-task torch.optim.SGD heads and classify separable support embeddings perfectly."""
    g = torch.Generator().manual_seed(0)
    tasks, ways, shots, dim = 3, 4, 5, 6
    means = 3 * torch.randn(tasks, ways, 1, dim, generator=g, dtype=torch.float64)
    support = means + 0.3 * torch.randn(tasks, ways, shots, dim, generator=g, dtype=torch.float64)
    support = support.reshape(tasks, ways * shots, dim)
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    weight, bias = finetune(tiny()).fit_heads(support, labels, ways)
    assert weight.shape == (tasks, ways, dim) and bias.shape == (tasks, ways)
    for t, head in enumerate(naive_heads(support, labels, ways)):
        assert torch.allclose(weight[t], head.weight, rtol=1e-10, atol=1e-12)
        assert torch.allclose(bias[t], head.bias, rtol=1e-10, atol=1e-12)
    predictions = (support @ weight.transpose(1, 2) + bias[:, None]).argmax(dim=-1)
    assert torch.equal(predictions, labels)


def test_finetune_predict_fits_heads_on_frozen_features():
    """predict equals naive per-task heads on the body's embeddings, and leaves the backbone untouched."""
    model, batch = tiny(num_classes=7), episodes(tasks=2, shots=2, queries=2)
    algo = finetune(model, head_steps=20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = algo.predict(batch)
    assert got.shape == (2, WAYS * 2, WAYS)
    with torch.no_grad():
        embedded = [model.features(torch.cat([sx, qx])) for sx, qx in zip(batch.support, batch.query)]
    support = torch.stack([e[:6] for e in embedded])
    heads = naive_heads(support, batch.support_labels, WAYS, steps=20)
    with torch.no_grad():
        expected = torch.stack([head(e[6:]) for head, e in zip(heads, embedded)])
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def naive_distill_loss(student_logits, teacher_logits, labels, temperature, weight):
    """(1 - w) CE + w T^2 KL(softmax(teacher/T) || softmax(student/T)), batch mean, from exp/log/sum."""

    def log_softmax(z):
        shifted = z - z.max(dim=-1, keepdim=True).values
        return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()

    log_p_student = log_softmax(student_logits)
    cross_entropy = -sum(log_p_student[i, labels[i]] for i in range(len(labels))) / len(labels)
    log_t, log_s = log_softmax(teacher_logits / temperature), log_softmax(student_logits / temperature)
    kl = sum((log_t[i].exp() * (log_t[i] - log_s[i])).sum() for i in range(len(labels))) / len(labels)
    return (1 - weight) * cross_entropy + weight * temperature**2 * kl


def distill(student, teacher, temperature, weight):
    algo = Distill(
        student,
        teacher="not-a-run-folder",
        temperature=temperature,
        distill_weight=weight,
        outer_lr=1e-3,
        batch_size=8,
        **HEAD,
    )
    algo._teacher = teacher.train().requires_grad_(False)
    return algo


@pytest.mark.parametrize("temperature,weight", [(4.0, 0.5), (2.0, 0.9), (3.0, 0.0)])
def test_distill_loss_matches_hand_computation(temperature, weight):
    """The distillation loss is (1 - w) CE + w T^2 KL(teacher_T || student_T), and a training step
    reports it, moves the student and leaves the teacher alone."""
    student, teacher = tiny(num_classes=5, seed=0), tiny(num_classes=5, seed=1)
    g = torch.Generator().manual_seed(0)
    batch = LabelledImages(
        torch.rand(8, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    )
    algo = distill(student, teacher, temperature, weight)
    with torch.no_grad():
        expected = naive_distill_loss(student(batch.images), teacher(batch.images), batch.labels, temperature, weight)
        got = algo.loss(student(batch.images), batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    teacher_before, student_before = params_of(teacher), params_of(student)
    out = algo.meta_train_step(batch)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-12)
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    assert any(not torch.equal(student_before[n], p) for n, p in student.named_parameters())
    assert all(p.grad is None for p in teacher.parameters())


# --- the MAML family's task threads ---------------------------------------------


@pytest.mark.parametrize("variant", ["maml", "fomaml", "anil", "metasgd"])
def test_task_threads_give_the_one_thread_loop_results(variant):
    """Splitting the meta-batch over two worker threads (the CPU default) changes neither the
    meta-gradients nor a training step, for every member of the MAML family."""
    batch = episodes(tasks=5)
    kwargs = {
        "maml": {},
        "fomaml": {"first_order": True},
        "anil": {"head_only": True},
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
