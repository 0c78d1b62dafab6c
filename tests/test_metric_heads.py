"""The heads of the metric-based learners against their papers' formulas, computed by hand on tiny tensors:
Matching Networks' cosine attention, R2-D2's ridge regression (both of its forms, and its gradient)."""

import math

import torch

from metalearn.algorithms.matchingnet import attention_log_probabilities
from metalearn.algorithms.r2d2 import ridge_weights


def tiny_task(seed=0, ways=3, shots=2, queries=4, dim=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(ways * shots, dim, generator=g, dtype=dtype)
    labels = torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)]  # unordered
    query = torch.randn(queries, dim, generator=g, dtype=dtype)
    return support, labels, query, ways


def test_matching_attention_is_the_softmax_of_cosines_summed_per_class():
    support, labels, query, ways = tiny_task()
    got = attention_log_probabilities(support, labels, query, ways)
    for q in range(len(query)):
        cosines = [float(query[q] @ support[i] / (query[q].norm() * support[i].norm())) for i in range(len(support))]
        total = sum(math.exp(c) for c in cosines)
        attention = [math.exp(c) / total for c in cosines]
        for c in range(ways):
            share = sum(a for a, y in zip(attention, labels.tolist(), strict=True) if y == c)
            assert math.isclose(float(got[q, c]), math.log(share), rel_tol=1e-12)
    # the logits are log-probabilities: cross-entropy on them is the paper's negative log-likelihood
    assert torch.allclose(got.exp().sum(dim=-1), torch.ones(len(query), dtype=torch.float64))


def one_hot(labels, ways):
    return torch.nn.functional.one_hot(labels, ways).double()


def test_ridge_weights_solve_the_normal_equations_in_both_forms():
    lam = torch.tensor(0.7, dtype=torch.float64)
    for dim in (5, 40):  # fewer features than support images (the primal form), then more (Woodbury)
        support, labels, query, ways = tiny_task(dim=dim)
        y = one_hot(labels, ways)
        expected = torch.linalg.solve(support.T @ support + lam * torch.eye(dim, dtype=torch.float64), support.T @ y)
        assert torch.allclose(ridge_weights(support, y, lam), expected, rtol=1e-9, atol=1e-10)
        # the minimiser of |XW - Y|^2 + lambda |W|^2: its gradient there is zero
        residual_grad = 2 * support.T @ (support @ expected - y) + 2 * lam * expected
        assert residual_grad.abs().max() < 1e-9


def test_ridge_gradient_through_the_solve_equals_finite_differences():
    support, labels, query, ways = tiny_task(dim=8)  # Woodbury
    y = one_hot(labels, ways)

    def query_logits(x, log_lam, q):
        return (q @ ridge_weights(x, y, log_lam.exp())).sin().sum()  # a non-linear read-out of the logits

    inputs = (support.clone().requires_grad_(), torch.tensor(-0.3, dtype=torch.float64, requires_grad=True), query)
    assert torch.autograd.gradcheck(query_logits, inputs, eps=1e-6, atol=1e-6)


def test_relation_scores_and_their_squared_error_by_hand():
    from metalearn.algorithms.relationnet import relation_loss, relation_scores

    support, labels, query, ways = tiny_task(dim=4)
    g = torch.Generator().manual_seed(1)
    head = {
        "w1": torch.randn(6, 8, generator=g, dtype=torch.float64),
        "b1": torch.randn(6, generator=g, dtype=torch.float64),
        "w2": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "b2": torch.randn(8, generator=g, dtype=torch.float64),
        "w3": torch.randn(1, 8, generator=g, dtype=torch.float64),
        "b3": torch.randn(1, generator=g, dtype=torch.float64),
    }
    got = relation_scores(head, support, labels, query, ways)
    expected = torch.empty(len(query), ways, dtype=torch.float64)
    for q in range(len(query)):
        for c in range(ways):
            summed = sum(support[i] for i in range(len(support)) if labels[i] == c)  # the class's K shots summed
            x = torch.cat([query[q], summed])
            x = torch.relu(head["w1"] @ x + head["b1"])
            x = torch.relu(head["w2"] @ x + head["b2"])
            expected[q, c] = torch.sigmoid(head["w3"] @ x + head["b3"])[0]
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    query_labels = torch.tensor([2, 0, 1, 1])
    squared = [(float(expected[q, c]) - int(c == query_labels[q])) ** 2 for q in range(4) for c in range(ways)]
    assert math.isclose(float(relation_loss(got, query_labels, ways)), sum(squared) / len(squared), rel_tol=1e-12)


def test_r2d2_logits_are_the_learned_scale_and_bias_around_the_ridge_prediction():
    from metalearn.algorithms.r2d2 import R2D2
    from metalearn.models import build_model

    model = build_model({"_target_": "metalearn.models.conv4.Conv4", "name": "conv4", "hidden": 4}, 0, (1, 28, 28))
    algo = R2D2(model.double(), 1e-3, 0.5, 10, ridge_lambda=0.5, scale=2.0, bias=0.25, vectorize=False)
    support, labels, query, ways = tiny_task(dim=4)
    head = {k: v.detach() for k, v in algo.head_params.items()}
    assert math.isclose(float(head["log_lambda"]), math.log(0.5)) and float(head["scale"]) == 2.0
    weights = ridge_weights(support, one_hot(labels, ways), torch.tensor(0.5, dtype=torch.float64))
    expected = 2.0 * query @ weights + 0.25
    assert torch.allclose(algo.head_logits(head, support, labels, query, ways), expected, rtol=1e-9)
