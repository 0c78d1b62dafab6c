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
