"""Reptile against a naive hand-written reference (plain autograd / torch.optim, float64)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import WAYS, assert_dicts_close, episodes, mean_over_tasks, params_of, tiny

from metalearn.algorithms.reptile import Reptile
from metalearn.errors import MetalearnError

pytestmark = pytest.mark.usefixtures("one_thread")  # tensors this small run fastest on one thread


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
    for x, y, order in zip(batch.support, batch.support_labels, orders, strict=False):
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
    meta_step=0.7,
    meta_step_final=0.0,
    total_steps=10,
    inner_lr=0.05,
    inner_steps=3,
    inner_batch=4,
    workers=1,
):
    return Reptile(
        model,
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        inner_batch=inner_batch,
        inner_optimizer=optimizer,
        inner_steps_eval=4,
        inner_batch_eval=4,
        meta_step=meta_step,
        meta_step_final=meta_step_final,
        anneal_steps=None,
        train_steps=total_steps,
        vectorize=vectorize,
        workers=workers,
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(
    "vectorize, workers", [(False, 1), (False, 2), (True, 1)], ids=["loop", "loop-2-threads", "vmap"]
)
def test_reptile_step_moves_weights_toward_naive_adapted_weights(optimizer, vectorize, workers):
    """One outer step equals theta + eps (mean phi - theta) with phi from a per-task torch.optim loop
    (Adam with beta1=0 or SGD) whose minibatches run on into a reshuffled second pass."""
    model, batch = tiny(), episodes(shots=3, queries=1)  # 9 images, 3 steps of 4: a second pass
    lr = 0.01 if optimizer == "adam" else 0.1
    algo = reptile(model, optimizer, vectorize, inner_lr=lr, workers=workers)
    expected = naive_reptile(model, batch, 7, lr, 3, 4, optimizer, eps=0.7)
    torch.manual_seed(7)
    out = algo.meta_train_step(batch)
    assert set(out) >= {"loss", "accuracy"} and out["loss"] > 0 and 0 <= out["accuracy"] <= 1
    got = params_of(model)
    assert_dicts_close(got, expected, 1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_reptile_outer_step_size_anneals_linearly():
    """Step k interpolates with eps_k = meta_step + (final - meta_step) * min(k / total_steps, 1)."""
    model, batch = tiny(), episodes(tasks=2, shots=2, queries=1)
    algo = reptile(model, meta_step=0.9, meta_step_final=0.1, total_steps=3, inner_steps=2, inner_batch=3)
    for k, eps in enumerate([0.9, 0.9 - 0.8 / 3, 0.9 - 1.6 / 3, 0.1, 0.1]):
        expected = naive_reptile(model, batch, k, 0.05, 2, 3, "sgd", eps)
        torch.manual_seed(k)
        algo.meta_train_step(batch)
        assert_dicts_close(params_of(model), expected, 1e-10)
    assert algo.state_dict()["step"] == 5


def test_reptile_resumes_the_anneal_from_its_state():
    """A restored step count sets eps: loading step=2 of 4 gives eps halfway."""
    model, batch = tiny(), episodes(tasks=2, shots=2, queries=1)
    algo = reptile(model, meta_step=1.0, meta_step_final=0.0, total_steps=4, inner_steps=1)
    algo.load_state_dict({"model": model.state_dict(), "step": 2})
    expected = naive_reptile(model, batch, 3, 0.05, 1, 4, "sgd", eps=0.5)
    torch.manual_seed(3)
    algo.meta_train_step(batch)
    assert_dicts_close(params_of(model), expected, 1e-10)


def test_reptile_schedule_is_the_one_the_run_started_with():
    """Resumed with a longer train.steps, eps follows the saved schedule (4 steps), not the new length."""
    model = tiny()
    started = reptile(model, meta_step=1.0, meta_step_final=0.2, total_steps=4, inner_steps=1)
    state = {**started.state_dict(), "step": 2}
    longer = reptile(model, meta_step=1.0, meta_step_final=0.2, total_steps=40, inner_steps=1)
    longer.load_state_dict(state)
    assert longer.anneal_steps == 4 and longer.outer_step_size() == pytest.approx(0.6)
    longer.check_resume(40)  # eps goes on at 0.2 after step 4: allowed
    with_zero = reptile(model, meta_step=1.0, meta_step_final=0.0, total_steps=40, inner_steps=1)
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
        meta_step=1.0,
        meta_step_final=0.0,
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


@pytest.mark.parametrize("workers", [1, 2], ids=["one-thread", "two-threads"])
def test_reptile_predict_fine_tunes_like_the_naive_loop_without_touching_the_rng(workers):
    """predict fine-tunes each task on its support set (fixed order, seed 0 generator) and leaves
    torch's global RNG as it was; with two task threads, each scores its share of the tasks alike."""
    model, batch = tiny(), episodes(shots=3, queries=2)
    algo = reptile(model, inner_lr=0.1, workers=workers)
    # one fixed order for every task: an episode scores the same in any batch or process
    orders = torch.rand(1, 2, 9, generator=torch.Generator().manual_seed(0)).argsort(dim=2).flatten(1).tolist() * 3
    expected = []
    for sx, sy, qx, order in zip(batch.support, batch.support_labels, batch.query, orders, strict=False):
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
