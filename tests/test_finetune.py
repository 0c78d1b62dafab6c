"""finetune and distill against naive hand-written references (per-task torch.optim heads, the loss by hand)."""

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import WAYS, episodes, params_of, tiny
from torch import nn

from metalearn.algorithms.finetune import Distill, Finetune
from metalearn.data import LabelledImages

pytestmark = pytest.mark.usefixtures("one_thread")  # tensors this small run fastest on one thread


HEAD = dict(head_lr=0.01, head_momentum=0.9, head_dampening=0.9, head_weight_decay=1e-3, head_steps=100)


def finetune(model, **overrides):
    return Finetune(model, outer_lr=1e-3, batch_size=8, **{**HEAD, **overrides})


def naive_heads(support, labels, ways, steps=100):
    """One nn.Linear per task, zero-initialised, fitted with torch.optim.SGD at the finetune settings."""
    heads = []
    for x, y in zip(support, labels, strict=False):
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


@pytest.mark.parametrize("workers", [1, 2], ids=["one-thread", "two-threads"])
def test_finetune_predict_fits_heads_on_frozen_features(workers):
    """predict equals naive per-task heads on the body's embeddings (with two task threads too: each
    embeds its share of the tasks), and leaves the backbone untouched."""
    model, batch = tiny(num_classes=7), episodes(tasks=3, shots=2, queries=2)
    algo = finetune(model, head_steps=20, workers=workers)
    with torch.no_grad():  # weights that change after the algorithm is built (as training changes them) are used
        for p in model.parameters():
            p.mul_(1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = algo.predict(batch)
    assert got.shape == (3, WAYS * 2, WAYS)
    with torch.no_grad():
        embedded = [model.features(torch.cat([sx, qx])) for sx, qx in zip(batch.support, batch.query, strict=False)]
    support = torch.stack([e[:6] for e in embedded])
    heads = naive_heads(support, batch.support_labels, WAYS, steps=20)
    with torch.no_grad():
        expected = torch.stack([head(e[6:]) for head, e in zip(heads, embedded, strict=False)])
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
    frozen = teacher.train().requires_grad_(False)
    algo._teacher = (frozen, frozen)  # the network, and its logits (a linear classifier)
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
