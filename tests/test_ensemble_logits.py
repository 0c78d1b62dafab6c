"""eval.ensemble=logits: an ensemble averages its members' logits (MAML++'s code), and a run's setting reaches
`metalearn eval`, for checkpoint=topN and for ensembles of runs."""

import json
import math
import shutil

import pytest
import torch
from helpers.runs import overrides_for

from metalearn.config.schema import EnsembleMean
from metalearn.data import ClassSplit, EpisodeSampler
from metalearn.evaluate import score_episodes, with_ensemble

WAYS = 3


def test_the_logit_ensemble_is_the_mean_of_the_members_logits():
    """One query on which the two means disagree: the logits' mean says class 1, the probabilities' class 0."""
    a, b = torch.tensor([[[4.0, 0.0, 0.0]]]), torch.tensor([[[-4.0, 1.0, 0.0]]])  # [tasks, queries, ways]
    *_, (logits, finite) = with_ensemble([a, b], EnsembleMean.logits)
    assert torch.equal(logits, torch.tensor([[[0.0, 0.5, 0.0]]])) and finite.all()
    *_, (log_probabilities, _) = with_ensemble([a, b])
    by_hand = [(math.exp(x) / (math.exp(4) + 2) + math.exp(y) / (math.exp(1) + 2)) / 2 for x, y in [(4, -4), (0, 1)]]
    assert by_hand[0] > by_hand[1]  # class 0 ahead when the probabilities are averaged
    assert log_probabilities.argmax(dim=-1).item() == 0 and logits.argmax(dim=-1).item() == 1


class Fixed:
    """Logits per image id (an image's first pixel holds its id), drawn once from `salt`."""

    def __init__(self, salt: int, images: int):
        self.table = 3 * torch.randn(images, WAYS, generator=torch.Generator().manual_seed(salt))

    def predict(self, episodes):
        return self.table[(episodes.query[..., 0, 0, 0] * 255).round().long()]


def test_score_episodes_averages_logits_when_asked():
    labels = torch.arange(6).repeat_interleave(5)
    images = torch.zeros(len(labels), 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    sampler = EpisodeSampler(ClassSplit(images, labels, "coded", part="test"), WAYS, 1, 2, "cpu", seed=0)
    members = [Fixed(1, len(labels)), Fixed(2, len(labels))]
    accuracies, losses = [], []
    for i in range(20):
        episode = sampler.episodes(i, 1)
        mean = sum(m.predict(episode)[0] for m in members) / 2  # [queries, ways]
        truth = episode.query_labels[0]
        accuracies.append((mean.argmax(dim=-1) == truth).double().mean().item())
        losses.append((mean.logsumexp(dim=-1) - mean[torch.arange(len(truth)), truth]).mean().item())
    *_, logits = score_episodes(members, sampler, 20, 7, "test", ensemble=EnsembleMean.logits)
    *_, probabilities = score_episodes(members, sampler, 20, 7, "test")
    assert logits.accuracy == pytest.approx(sum(accuracies) / 20, rel=1e-12)
    assert logits.loss == pytest.approx(sum(losses) / 20, rel=1e-5)
    assert (logits.accuracy, logits.loss) != (probabilities.accuracy, probabilities.loss)


def records(run):
    return [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]


def test_a_mamlpp_presets_run_is_evaluated_with_the_logit_ensemble(cli, tiny_overrides, tmp_path, one_thread):
    """The preset's eval.ensemble=logits is in the run's config, which `metalearn eval` replays."""
    overrides = [o for o in overrides_for("mamlpp", tiny_overrides) if not o.startswith(("algo=", "train.", "eval."))]
    steps = [
        "train.steps=2",
        "train.val_every=1",
        "train.val_episodes=2",
        "train.ckpt_every=1",
        "train.meta_batch_size=1",
    ]
    run = tmp_path / "run"
    cli("train", "experiment=mamlpp_omniglot_5w1s", *overrides, *steps, f"hydra.run.dir={run}", cwd=tmp_path)
    out = cli("eval", f"run={run}", "checkpoint=top2", "eval.episodes=3", cwd=tmp_path).stdout
    assert "ensemble of the 2 best checkpoints" in out and "mean logits)" in out
    assert records(run)[-1]["checkpoint"] == "top2" and records(run)[-1]["averaged"] == "logits"
    cli("eval", f"run={run}", "checkpoint=top2", "eval.episodes=3", "eval.ensemble=probabilities", cwd=tmp_path)
    by_logits, by_probabilities = records(run)
    assert by_probabilities["averaged"] == "probabilities" and by_probabilities["loss"] != by_logits["loss"]

    # an ensemble of runs: each run's own setting
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("evals.jsonl"))
    out = cli("eval", f"run=[{run},{copy}]", "eval.episodes=3", cwd=tmp_path).stdout
    assert "ensemble of 2: " in out and "mean logits)" in out
    assert records(run)[-1]["ensemble"]["averaged"] == records(copy)[-1]["ensemble"]["averaged"] == "logits"
    saved = copy / ".hydra" / "overrides.yaml"
    saved.write_text(saved.read_text() + "- eval.ensemble=probabilities\n")
    failed = cli("eval", f"run=[{run},{copy}]", "eval.episodes=3", cwd=tmp_path, check=False)
    assert failed.returncode == 1 and "eval.ensemble=logits" in failed.stderr
    assert "eval.ensemble=probabilities" in failed.stderr and str(copy) in failed.stderr
    cli("eval", f"run=[{run},{copy}]", "eval.episodes=3", "eval.ensemble=probabilities", cwd=tmp_path)
    assert records(copy)[-1]["ensemble"]["averaged"] == "probabilities"
    wrong = cli("eval", f"run={run}", "checkpoint=top2", "eval.ensemble=median", cwd=tmp_path, check=False)
    assert wrong.returncode == 1 and "expected one of [probabilities, logits]" in wrong.stderr
