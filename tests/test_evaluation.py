"""The numbers a user reads, computed by hand: accuracy, loss, interval, the ensemble, the split and
episodes scored, the checkpoint called best, the metrics of a resumed run."""

import hashlib
import json
import math
import shutil
import statistics

import pytest
import torch

from metalearn.algorithms import build_algorithm
from metalearn.config import compose
from metalearn.data import ClassSplit, EpisodeSampler, load_split
from metalearn.errors import MetalearnError
from metalearn.evaluate import EpisodeResult, score_episodes

from helpers.data import tiny_data_config
from helpers.reference import episodes
from helpers.runs import overrides_for

WAYS, QUERIES = 4, 3


def coded_split(classes=9, per_class=6) -> ClassSplit:
    """Each image's first pixel holds its id, so a stub can give every image fixed logits."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)
    return ClassSplit(images, labels, "coded", part="test")


class FixedLogits:
    """Logits per image id, drawn once from `salt`: the same for an image whatever batch it comes in."""

    def __init__(self, salt: int, images: int = 54):
        self.table = torch.randn(images, WAYS, generator=torch.Generator().manual_seed(salt))

    def predict(self, episodes):
        ids = (episodes.query[..., 0, 0, 0] * 255).round().long()  # [T, queries]
        return self.table[ids]


def by_hand(members, sampler, episodes):
    """Per-episode accuracy and loss in plain Python; the ensemble averages the members' probabilities."""
    accuracies, losses = [], []
    for i in range(episodes):
        ep = sampler.episodes(i, 1)
        rows = [m.predict(ep)[0].tolist() for m in members]  # per member: [queries][ways]
        labels = ep.query_labels[0].tolist()
        correct, loss = 0, 0.0
        for q, label in enumerate(labels):
            probs = [0.0] * WAYS
            for row in rows:
                exps = [math.exp(v) for v in row[q]]
                probs = [p + e / sum(exps) / len(rows) for p, e in zip(probs, exps)]
            correct += max(range(WAYS), key=lambda k: probs[k]) == label
            loss -= math.log(probs[label])
        accuracies.append(correct / len(labels))
        losses.append(loss / len(labels))
    mean = statistics.fmean(accuracies)
    return mean, 1.96 * statistics.stdev(accuracies) / math.sqrt(episodes), statistics.fmean(losses)


def assert_result(result: EpisodeResult, expected):
    accuracy, ci95, loss = expected
    assert result.accuracy == pytest.approx(accuracy, rel=1e-12)
    assert result.ci95 == pytest.approx(ci95, rel=1e-9)
    assert result.loss == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 40, None])
def test_score_episodes_computes_accuracy_loss_interval_and_ensemble(batch_size):
    sampler = EpisodeSampler(coded_split(), WAYS, 1, QUERIES, "cpu", seed=0)
    a, b = FixedLogits(1), FixedLogits(2)
    results = score_episodes([a, b], sampler, 40, batch_size, "test")
    assert len(results) == 3
    assert_result(results[0], by_hand([a], sampler, 40))
    assert_result(results[1], by_hand([b], sampler, 40))
    ensemble = by_hand([a, b], sampler, 40)
    assert_result(results[2], ensemble)
    assert results[2].accuracy != results[0].accuracy  # the ensemble is not its first member
    ids = sampler.episode_ids(0, 40)
    assert {r.episode_digest for r in results} == {hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


class FitsEight(FixedLogits):
    """Runs out of (GPU) memory on more than 8 episodes at once, or on any with `limit=0`."""

    def __init__(self, salt: int, limit: int = 8):
        super().__init__(salt)
        self.limit = limit

    def predict(self, episodes):
        if episodes.num_tasks > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().predict(episodes)


def test_out_of_memory_halves_the_batch_and_changes_nothing():
    sampler = EpisodeSampler(coded_split(), WAYS, 1, QUERIES, "cpu", seed=0)
    (result,) = score_episodes([FitsEight(1)], sampler, 40, 40, "test")
    assert result.batch_size == 5  # 40, 20, 10 ran out of memory
    assert_result(result, by_hand([FixedLogits(1)], sampler, 40))
    with pytest.raises(MetalearnError, match="one evaluation episode does not fit in GPU memory"):
        score_episodes([FitsEight(1, limit=0)], sampler, 4, None, "test")


# --- through the CLI ---------------------------------------------------------------


def test_eval_scores_the_test_split(cli, tiny_overrides, tiny_data, tmp_path):
    """13-way tasks: the tiny split's test part has 16 classes, train 12 and val 8, so only it can serve them."""
    run = tmp_path / "run"
    cli("train", *overrides_for("protonet", tiny_overrides), "train.steps=1", f"hydra.run.dir={run}", cwd=tmp_path)
    out = cli("eval", f"run={run}", "task.ways=13", cwd=tmp_path).stdout
    assert "(10 episodes, omniglot 13-way 1-shot, best.pt)" in out
    record = json.loads((run / "evals.jsonl").read_text())
    assert record["part"] == "test"
    test = EpisodeSampler(load_split(tiny_data_config(tiny_data), "test"), 13, 1, 3, "cpu", seed=0)
    assert record["episode_digest"] == hashlib.sha256(test.episode_ids(0, 10).numpy().tobytes()).hexdigest()


def test_one_episode_set_for_every_batch_size_and_algorithm(cli, tiny_overrides, tiny_data, tmp_path):
    """120 test episodes scored 1, 7, 32 or 120 at a time (uneven last batches), by MAML and by ProtoNet:
    the same 120 tasks and the same score."""
    test = EpisodeSampler(load_split(tiny_data_config(tiny_data), "test"), 5, 1, 3, "cpu", seed=0)
    expected = hashlib.sha256(test.episode_ids(0, 120).numpy().tobytes()).hexdigest()
    for algo in ("maml", "protonet"):
        run = tmp_path / algo
        cli("train", *overrides_for(algo, tiny_overrides), "train.steps=1", f"hydra.run.dir={run}", cwd=tmp_path)
        # float32: bf16 rounds differently when one task runs on every core or several on one core each,
        # which a near-tie between two classes can turn into another answer
        for size in (1, 7, 32, 120):
            cli("eval", f"run={run}", "eval.episodes=120", f"eval.batch_size={size}", "device.amp=false", cwd=tmp_path)
        # the same run moved to another device: here the CPU named explicitly
        cli("eval", f"run={run}", "eval.episodes=120", "device=cpu", "device.amp=false", cwd=tmp_path)
        records = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
        assert [r["batch_size"] for r in records] == [1, 7, 32, 120, 50]
        assert {r["episode_digest"] for r in records} == {expected}
        assert len({r["accuracy"] for r in records}) == 1, [r["accuracy"] for r in records]


def test_eval_record_says_how_it_was_measured(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *tiny_overrides, "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    cli("eval", f"run={run}", "eval.seed=3", "eval.batch_size=4", cwd=tmp_path)
    record = json.loads((run / "evals.jsonl").read_text())
    best = run / "checkpoints" / "best.pt"
    import metalearn

    assert record["seed"] == 3 and record["batch_size"] == 4 and record["queries"] == 3
    assert record["inner_steps_eval"] == 2 and record["batch_norm"] == "transductive"
    assert record["step"] == torch.load(best, weights_only=True)["step"]
    assert record["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert record["metalearn"] == metalearn.__version__ and record["torch"] == torch.__version__
    assert record["device"] == "cpu" and record["hardware"]


def test_best_checkpoint_is_the_best_validation(cli, tiny_overrides, tmp_path, monkeypatch):
    """Validation accuracies 50, 90, 30, 40%: best.pt is step 2's, not the last one's."""
    scripted = iter([0.5, 0.9, 0.3, 0.4])

    def fake_validation(algo, sampler, episodes, batch_size, desc, ranks):
        return EpisodeResult(accuracy=next(scripted), ci95=0.01, loss=1.0, episodes=episodes)

    monkeypatch.setattr("metalearn.hooks.run_episodes", fake_validation)
    run = tmp_path / "run"
    cli("train", *tiny_overrides, "train.val_every=1", f"hydra.run.dir={run}", cwd=tmp_path)
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]
    assert [r["accuracy"] for r in val] == [0.5, 0.9, 0.3, 0.4]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["best_val_accuracy"] == 0.9
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 4 and not torch.equal(
        best["algo"]["model"]["head.weight"], last["algo"]["model"]["head.weight"]
    )


def test_a_resumed_run_drops_the_lines_a_crash_left_behind(cli, tiny_overrides, tmp_path):
    """A crash after step 6's lines but before its checkpoint: resuming from step 3 rewrites 4..6 once."""
    common = [*tiny_overrides, "train.steps=6", "train.val_every=3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cli("train", *common, f"hydra.run.dir={straight}", cwd=tmp_path)
    cli("train", *common, "train.steps=3", f"hydra.run.dir={crashed}", cwd=tmp_path)
    at_step_3 = tmp_path / "last-at-3.pt"
    shutil.copy(crashed / "checkpoints" / "last.pt", at_step_3)
    cli("train", f"resume={crashed}", "train.steps=6", cwd=tmp_path)
    shutil.copy(at_step_3, crashed / "checkpoints" / "last.pt")  # lines 4..6 remain, the checkpoint is step 3's
    cli("train", f"resume={crashed}", "train.steps=6", cwd=tmp_path)

    def lines(run):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("time", "tasks_per_s")}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert lines(crashed) == lines(straight)
    assert [r["step"] for r in lines(crashed) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("algo", ["maml", "reptile", "protonet", "finetune"])
def test_an_episode_scores_the_same_on_any_number_of_cores(algo):
    """Evaluation runs each task on one core (the task threads), so its float32 logits are the same bits
    on two cores as on one: a score does not depend on the machine's core count."""
    steps = {"finetune": ["algo.head_steps=3"], "protonet": []}.get(algo, ["algo.inner_steps_eval=3"])
    cfg = compose([f"algo={algo}", f"task.ways={WAYS}", "device.amp=false", *steps])
    batch = episodes(tasks=4, shots=1, queries=7, ways=WAYS, dtype=torch.float32)
    threads = torch.get_num_threads()
    logits = []
    try:
        for cores in (2, 1):
            torch.set_num_threads(cores)
            torch.manual_seed(0)
            scorer = build_algorithm(cfg, torch.device("cpu"), 10, (1, 28, 28))
            logits.append(scorer.predict(batch))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits[0], logits[1])
