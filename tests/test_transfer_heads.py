"""The heads of the transfer baselines against their papers' formulas, by hand on tiny tensors: Baseline++'s
cosine classifier (pretraining and test time) and SimpleShot's nearest centroid on centred, L2-normalised
embeddings with the training classes' running mean; then a run that trains one way and evaluates each."""

import json
import math

import pytest
import torch
from helpers.reference import episodes, tiny
from helpers.runs import overrides_for

from metalearn.algorithms.finetune import (
    BASE_MEAN_MOMENTUM,
    Finetune,
    cosine_logits,
    cosine_scale,
    simpleshot_logits,
)
from metalearn.data import LabelledImages

HEAD = dict(head_lr=0.01, head_momentum=0.9, head_dampening=0.9, head_weight_decay=1e-3, head_steps=5)


def test_cosine_logits_are_the_scaled_cosines_and_the_scale_follows_the_authors_rule():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = cosine_logits(x, w, 2.0)
    for i in range(4):
        for c in range(3):
            expected = 2.0 * float(x[i] @ w[c]) / (float(x[i].norm()) * float(w[c].norm()))
            assert math.isclose(float(got[i, c]), expected, rel_tol=1e-12)
    assert (cosine_scale(5, None), cosine_scale(200, None), cosine_scale(201, None), cosine_scale(4112, 3.0)) == (
        2.0,
        2.0,
        10.0,
        3.0,
    )


def test_simpleshot_is_the_nearest_centroid_of_centred_normalised_embeddings():
    g = torch.Generator().manual_seed(1)
    support, query = torch.randn(2, 6, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, generator=g)
    query = query.double()
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    got = simpleshot_logits(support, labels, query, 3, mean)
    for t in range(2):
        normed = [(s - mean) / (s - mean).norm() for s in support[t]]
        for q in range(4):
            z = (query[t, q] - mean) / (query[t, q] - mean).norm()
            for c in range(3):
                members = [normed[i] for i in range(6) if labels[t, i] == c]
                centroid = sum(members) / len(members)
                assert math.isclose(float(got[t, q, c]), -float((z - centroid).pow(2).sum()), rel_tol=1e-9)


def test_baseline_pp_pretrains_on_cosine_logits_and_keeps_the_training_classes_running_mean():
    model = tiny(num_classes=5)
    algo = Finetune(model, outer_lr=1e-3, batch_size=8, classifier="cosine", **HEAD)
    g = torch.Generator().manual_seed(0)
    expected_mean = torch.zeros(4, dtype=torch.float64)  # TinyNet embeds in `hidden` = 4
    for _ in range(2):  # the mean of each batch's embeddings, under the weights of that step
        batch = LabelledImages(
            torch.rand(8, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
        )
        with torch.no_grad():
            features = model.features(batch.images)
            logits = algo.classify(features)
            expected_loss = torch.nn.functional.cross_entropy(
                cosine_logits(features, model.head.weight, 2.0), batch.labels
            )
        assert torch.allclose(logits, cosine_logits(features, model.head.weight, 2.0))
        expected_mean = expected_mean + BASE_MEAN_MOMENTUM * (features.mean(dim=0) - expected_mean)
        assert algo.meta_train_step(batch)["loss"] == pytest.approx(expected_loss.item(), rel=1e-9)
    assert torch.allclose(algo.base_mean.double(), expected_mean, rtol=1e-6)
    assert torch.equal(algo.state_dict()["base_mean"], algo.base_mean)


def test_a_cosine_test_head_starts_from_the_class_means_and_simpleshot_fits_nothing():
    batch = episodes(tasks=2, shots=2, queries=2)
    model = tiny(num_classes=5)
    cosine = Finetune(model, outer_lr=1e-3, batch_size=8, classifier="cosine", **{**HEAD, "head_steps": 1})
    support = torch.randn(2, 6, 4, dtype=torch.float64)
    labels = batch.support_labels
    weight, _ = cosine.fit_heads(support, labels, batch.ways)
    means = torch.stack([torch.stack([support[t][labels[t] == c].sum(0) for c in range(batch.ways)]) for t in range(2)])
    assert not torch.allclose(weight, torch.zeros_like(weight))  # one SGD step from the class sums
    assert torch.nn.functional.cosine_similarity(weight, means, dim=-1).min() > 0.9
    simpleshot = Finetune(model, outer_lr=1e-3, batch_size=8, test_head="simpleshot", **HEAD)
    simpleshot.base_mean = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        embedded = torch.stack(
            [model.features(torch.cat([sx, qx])) for sx, qx in zip(batch.support, batch.query, strict=True)]
        )
    shots = batch.support.shape[1]
    expected = simpleshot_logits(embedded[:, :shots], labels, embedded[:, shots:], batch.ways, simpleshot.base_mean)
    assert torch.allclose(simpleshot.predict(batch), expected, rtol=1e-9)


def test_a_baseline_pp_run_evaluates_with_each_test_head(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli(
        "train",
        *overrides_for("finetune", tiny_overrides),
        "algo.classifier=cosine",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["algo"]["base_mean"].abs().sum() > 0
    for head in ("cosine", "linear", "simpleshot"):
        cli("eval", f"run={run}", f"algo.test_head={head}", cwd=tmp_path)
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 3 and len({e["accuracy"] for e in evals}) > 1  # three heads, not one result thrice
