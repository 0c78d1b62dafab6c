"""MAML++ against MAML and against its formulas by hand, in float64."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import assert_dicts_close, episodes
from helpers.runs import overrides_for, train_resume_eval
from torch.func import functional_call

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.mamlpp import msl_weights
from metalearn.config.compose import compose
from metalearn.errors import MetalearnError
from metalearn.models.step_norm import set_norm_step

WAYS = 3
EVERY_SWITCH_OFF = [
    "algo.multi_step_loss=false",
    "algo.per_step_bn_stats=false",
    "algo.per_step_bn_weights=false",
    "algo.learn_inner_lr=false",
    "algo.cosine_annealing=false",
]


def build(algo, *overrides, bn="transductive"):
    cfg = compose(
        [f"algo={algo}", f"task.ways={WAYS}", "model.hidden=4", "device.amp=false", f"model.bn={bn}", *overrides]
    )
    torch.manual_seed(0)
    return build_algorithm(cfg, torch.device("cpu"), 6, (1, 28, 28), dtype=torch.float64)


def test_msl_weights_follow_the_reference_schedule():
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    # epoch 4 of 10: each non-final weight falls by 4 x 1/(5*10); the final one takes what they give up
    assert msl_weights(5, 4, 10) == pytest.approx([0.12] * 4 + [0.52])
    # late: the non-final weights stop at 0.03 / 5, the final one at 1 - 4 x that
    assert msl_weights(5, 50, 10) == pytest.approx([0.006] * 4 + [0.976])
    assert sum(msl_weights(5, 7, 10)) == pytest.approx(1.0)


def batch_norm_names(model) -> set:
    """The BatchNorm layers' scales and shifts, found by the layers' type."""
    return {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if "BatchNorm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False)
    }


def test_with_every_switch_off_it_is_maml_with_batchnorm_meta_learned_only():
    """MAML's meta-gradient, by hand, with BatchNorm's scale and shift left out of the inner steps; the same
    by-hand function adapting them too is algo=maml's."""
    batch = episodes(tasks=3)
    common, last_step = ["algo.inner_steps=3", "algo.inner_lr=0.3", "algo.inner_loss=mean"], [0, 0, 1]
    mamlpp = build("mamlpp", *common, *EVERY_SWITCH_OFF)
    assert_dicts_close(mamlpp.meta_gradients(batch), naive_msl_meta_gradient(mamlpp.model, batch, 0.3, 3, last_step))
    maml = build("maml", *common)
    by_hand = naive_msl_meta_gradient(maml.model, batch, 0.3, 3, last_step, adapt_batch_norm=True)
    assert_dicts_close(maml.meta_gradients(batch), by_hand)


def naive_msl_meta_gradient(model, batch, inner_lr, steps, weights, losses=None, adapt_batch_norm=False):
    """By hand: per task, unrolled SGD with create_graph; the outer loss sum_k w_k * query loss after step k
    (appended to `losses`, per task, when given). BatchNorm's scale and shift stay as they are in the inner
    steps unless `adapt_batch_norm`."""
    names = [n for n, _ in model.named_parameters()]
    held = set() if adapt_batch_norm else batch_norm_names(model)
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in start]
    for sx, sy, qx, qy in zip(*batch, strict=False):
        fast, loss = list(start), 0
        for k in range(steps):
            support = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=False)), (sx,)), sy)
            grads = torch.autograd.grad(support, fast, create_graph=True)
            fast = [w if n in held else w - inner_lr * g for n, w, g in zip(names, fast, grads, strict=True)]
            loss = loss + weights[k] * F.cross_entropy(
                functional_call(model, dict(zip(names, fast, strict=False)), (qx,)), qy
            )
        total = [t + g / len(batch.support) for t, g in zip(total, torch.autograd.grad(loss, start), strict=False)]
        if losses is not None:
            losses.append(loss.item())
    return dict(zip(names, total, strict=False))


def test_the_multi_step_loss_is_the_weighted_sum_by_hand():
    batch = episodes(tasks=2)
    only_msl = [o for o in EVERY_SWITCH_OFF if "multi_step" not in o]
    algo = build("mamlpp", "algo.inner_steps=3", "algo.epoch_steps=1", "algo.msl_epochs=4", *only_msl)
    algo.step = 2  # epoch 2 of 4: unequal weights
    weights = msl_weights(3, 2, 4)
    assert len(set(weights)) == 2
    assert_dicts_close(algo.meta_gradients(batch), naive_msl_meta_gradient(algo.model, batch, 0.1, 3, weights))
    algo.step = 4  # msl_epochs over: the last step's loss alone
    assert_dicts_close(algo.meta_gradients(batch), naive_msl_meta_gradient(algo.model, batch, 0.1, 3, [0, 0, 1]))
    # the logged loss is the objective descended, the weighted sum, not the last step's query loss
    algo.step, losses = 2, []
    naive_msl_meta_gradient(algo.model, batch, 0.1, 3, weights, losses)
    assert algo.meta_train_step(batch)["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("stats", ["true", "false"], ids=["per-step-stats", "plain-norms"])
def test_without_per_step_weights_batchnorm_is_meta_learned_only(stats):
    """BNWB off: one shared scale and shift per layer, still never adapted in the inner loop (the reference)."""
    batch = episodes(tasks=2)
    settings = ["algo.inner_steps=2", "algo.per_step_bn_weights=false", f"algo.per_step_bn_stats={stats}"]
    algo = build("mamlpp", *settings, "algo.learn_inner_lr=false")
    norms = batch_norm_names(algo.model)
    assert len(norms) == 8 and not norms & set(algo.adapted_names)
    assert set(algo.adapted_names) == {n for n, _ in algo.model.named_parameters()} - norms
    with torch.no_grad():  # scales away from 1 and shifts away from 0: adapting them would move the result
        for name, p in algo.model.named_parameters():
            if name in norms:
                p.uniform_(0.5, 1.5)
    weights = algo.step_weights()
    held = naive_msl_meta_gradient(algo.model, batch, 0.1, 2, weights)
    adapted = naive_msl_meta_gradient(algo.model, batch, 0.1, 2, weights, adapt_batch_norm=True)
    assert not _close(held, adapted)
    assert_dicts_close(algo.meta_gradients(batch), held)


def test_derivative_order_switches_at_the_configured_epoch():
    batch = episodes(tasks=2)
    annealed = build("mamlpp", "algo.inner_steps=2", "algo.epoch_steps=2", "algo.first_order_epochs=1")
    first = build("mamlpp", "algo.inner_steps=2", "algo.epoch_steps=2", "algo.first_order=true")
    second = build("mamlpp", "algo.inner_steps=2", "algo.epoch_steps=2")
    for step, expected in [(0, first), (1, first), (2, second), (3, second)]:
        annealed.step = expected.step = step
        assert annealed.second_order() is (expected is second)
        assert_dicts_close(annealed.meta_gradients(batch), expected.meta_gradients(batch))
    assert not _close(first.meta_gradients(batch), second.meta_gradients(batch))


def _close(a, b):
    return all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-9) for n in a)


def test_learned_rates_get_gradients_and_adapt_at_test_time():
    batch = episodes(tasks=2)
    algo = build("mamlpp", "algo.inner_steps=2", "algo.inner_steps_eval=3")
    grads = algo.meta_gradients(batch)
    rate_grads = {n: g for n, g in grads.items() if n.startswith("inner_lr.")}
    assert set(rate_grads) == {f"inner_lr.{n}" for n in algo.adapted_names}
    assert all(g.shape == (2,) for g in rate_grads.values())
    assert all(g.abs().sum() > 0 for n, g in rate_grads.items() if n.endswith("weight"))
    before = {n: r.detach().clone() for n, r in algo.rates.items()}
    algo.meta_train_step(batch)
    # (a convolution's bias before BatchNorm has no effect, so its rate may get no gradient)
    assert all(not torch.equal(before[n], r) for n, r in algo.rates.items() if n.endswith("weight"))
    # At test time the steps use the learned rates (step 2 and later: the last step's): all zero = no adaptation.
    adapted = algo.predict(batch)
    with torch.no_grad():
        for rate in algo.rates.values():
            rate.zero_()
    unadapted = algo.predict(batch)
    algo.model.eval()
    set_norm_step(algo.model, 2)
    with torch.no_grad():
        plain = torch.stack([algo.model(q) for q in batch.query])
    assert torch.allclose(unadapted, plain, atol=1e-12)
    assert not torch.allclose(adapted, plain, atol=1e-6)


def test_per_step_running_statistics_are_kept_per_step_and_restored():
    batch = episodes(tasks=2)
    algo = build("mamlpp", "algo.inner_steps=3", bn="inductive")
    algo.meta_train_step(batch)
    norm = algo.model.features[0][1]
    assert norm.running_mean.shape == (3, 4)
    assert not torch.allclose(norm.running_mean[0], norm.running_mean[2])  # each step's own statistics
    assert all((norm.running_mean[k] != 0).all() for k in range(3))  # every step folded some in
    state = algo.state_dict()
    fresh = build("mamlpp", "algo.inner_steps=3", bn="inductive")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model.features[0][1].running_mean, norm.running_mean)
    assert fresh.step == 1
    assert torch.allclose(fresh.predict(batch), algo.predict(batch), atol=0)


def test_checkpointed_inner_steps_give_the_same_meta_gradient():
    batch = episodes(tasks=2)
    plain = build("mamlpp", "algo.inner_steps=3", "algo.epoch_steps=1", bn="inductive")
    checkpointed = build(
        "mamlpp", "algo.inner_steps=3", "algo.epoch_steps=1", "algo.checkpoint_inner=true", bn="inductive"
    )
    plain.step = checkpointed.step = 3  # MSL weights unequal, not yet annealed away
    assert_dicts_close(checkpointed.meta_gradients(batch), plain.meta_gradients(batch))


def test_cosine_annealing_of_the_outer_rate_and_resuming_past_it():
    algo = build("mamlpp", "train.steps=10", "algo.outer_lr=0.01", "algo.min_outer_lr=0.001")
    rates = []
    for step in (0, 5, 10):
        algo.step = step
        rates.append(algo.outer_lr_now())
    assert rates == pytest.approx([0.01, 0.001 + 0.009 * (1 + math.cos(math.pi / 2)) / 2, 0.001])
    with pytest.raises(MetalearnError, match="algo.anneal_steps=20.*algo.cosine_annealing=false"):
        algo.check_resume(20)
    algo.check_resume(10)


def test_inductive_mamlpp_trains_resumes_exactly_and_records_its_protocol(cli, tiny_overrides, tmp_path):
    run = train_resume_eval(cli, [*overrides_for("mamlpp", tiny_overrides), "model.bn=inductive"], tmp_path, "mamlpp")
    (record,) = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert record["batch_norm"] == "inductive"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["algo"]
    assert state["model"]["features.0.1.running_mean"].shape == (2, 8)  # per step, 8 channels


def paper_weights(epoch):
    """MAML++'s per-step loss importance for 2 inner steps annealed over 4 epochs, by hand: the first
    step's weight falls by 1/2/4 = 0.125 an epoch (to no less than 0.03/2), the last takes the rest."""
    first = max(0.5 - 0.125 * epoch, 0.015)
    return [first, min(0.5 + 0.125 * epoch, 0.985)] if epoch < 4 else [0.0, 1.0]


def test_the_multi_step_loss_anneals_over_epochs_of_several_steps():
    batch = episodes(tasks=2)
    only_msl = [o for o in EVERY_SWITCH_OFF if "multi_step" not in o]
    settings = ["algo.inner_steps=2", "algo.epoch_steps=3", "algo.msl_epochs=4", *only_msl]
    algo = build("mamlpp", *settings, "algo.first_order=true")  # the order does not change the weights
    seen = []
    for step in range(14):  # meta-iterations 0-2 are epoch 0, 3-5 epoch 1, ... 12 on: past the 4 epochs
        assert algo.step == step
        seen.append(algo.step_weights())
        algo.meta_train_step(batch)
    assert seen == [pytest.approx(paper_weights(step // 3)) for step in range(14)]
    assert seen[2] == pytest.approx([0.5, 0.5]) and seen[5] == pytest.approx([0.375, 0.625])
    # the outer loss uses them: step 7 is epoch 2's
    weighted = build("mamlpp", *settings)
    weighted.step = 7
    expected = naive_msl_meta_gradient(weighted.model, batch, 0.1, 2, paper_weights(2))
    assert_dicts_close(weighted.meta_gradients(batch), expected)
