"""The numbers a user reads, computed by hand: accuracy, loss, interval, the ensemble, the split and
episodes scored, the checkpoint called best, the metrics of a resumed run."""

import hashlib
import json
import math
import shutil
import statistics

import pytest
import torch
from helpers.data import tiny_data_config
from helpers.reference import episodes
from helpers.runs import overrides_for

from metalearn.algorithms import build_algorithm
from metalearn.config.compose import compose
from metalearn.data import ClassSplit, EpisodeSampler, load_split
from metalearn.errors import MetalearnError
from metalearn.evaluate import EpisodeResult, score_episodes

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


def by_hand(members, sampler, episodes, broken=lambda episode, query: False):
    """Per-episode accuracy and loss in plain Python; the ensemble averages the members' probabilities.
    A `broken` query (its logits not finite) is wrong, and its episode's loss NaN."""
    accuracies, losses = [], []
    for i in range(episodes):
        ep = sampler.episodes(i, 1)
        rows = [m.predict(ep)[0].tolist() for m in members]  # per member: [queries][ways]
        labels = ep.query_labels[0].tolist()
        correct, loss = 0, 0.0
        for q, label in enumerate(labels):
            if broken(i, q):
                loss = math.nan
                continue
            probs = [0.0] * WAYS
            for row in rows:
                exps = [math.exp(v) for v in row[q]]
                probs = [p + e / sum(exps) / len(rows) for p, e in zip(probs, exps, strict=False)]
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
    assert result.loss == pytest.approx(loss, rel=1e-5, nan_ok=True)


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


def support_of(episodes) -> list:
    """Each task's support image ids, sorted: what identifies an episode whatever batch it comes in."""
    ids = (episodes.support[..., 0, 0, 0] * 255).round().long()
    return [tuple(sorted(row)) for row in ids.tolist()]


class DivergesOn(FixedLogits):
    """FixedLogits, but the adaptation to the chosen episodes diverges: `nan`, all their logits are NaN;
    `inf`, class 0's is infinite (its argmax, class 0, is then right for 1 query in WAYS, as NaN's is);
    `one query`, only their first query's logits are NaN."""

    def __init__(self, salt: int, sampler: EpisodeSampler, chosen, how: str):
        super().__init__(salt)
        self.diverging = {support_of(sampler.episodes(i, 1))[0] for i in chosen}
        self.how = how

    def predict(self, episodes):
        logits = super().predict(episodes).clone()
        diverged = torch.tensor([s in self.diverging for s in support_of(episodes)])
        if self.how == "nan":
            logits[diverged] = math.nan
        elif self.how == "inf":
            logits[diverged, :, 0] = math.inf
        else:
            logits[diverged, 0] = math.nan
        return logits


@pytest.mark.parametrize("how", ["nan", "inf", "one query"])
@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_diverged_episodes_count_as_wrong_and_are_counted(batch_size, how):
    sampler = EpisodeSampler(coded_split(), WAYS, 1, QUERIES, "cpu", seed=0)
    chosen = {1, 4, 5, 9}

    def broken(episode, query):
        return episode in chosen and (how != "one query" or query == 0)

    healthy, diverging = FixedLogits(1), DivergesOn(2, sampler, chosen, how)
    # every task's queries hold each class equally: argmax-of-NaN's class 0 would be right for 1 in WAYS
    assert all((sampler.episodes(i, 1).query_labels == 0).double().mean() == 1 / WAYS for i in chosen)
    results = score_episodes([healthy, diverging], sampler, 12, batch_size, "test")
    assert [r.diverged_episodes for r in results] == [0, 4, 4]  # the ensemble is wrong where a member diverged
    assert_result(results[0], by_hand([healthy], sampler, 12))
    assert_result(results[1], by_hand([FixedLogits(2)], sampler, 12, broken))
    assert_result(results[2], by_hand([healthy, FixedLogits(2)], sampler, 12, broken))
    assert math.isnan(results[1].loss) and math.isnan(results[2].loss)


class Confident(FixedLogits):
    """Logits 1000 apart: each class probability but the top one is exactly 0, and the ensemble's log of it -inf."""

    def predict(self, episodes):
        return 1000 * super().predict(episodes)


def test_a_confident_ensemble_is_not_diverged():
    """Divergence is a member's non-finite logits, not the ensemble's -inf log-probabilities."""
    sampler = EpisodeSampler(coded_split(), WAYS, 1, QUERIES, "cpu", seed=0)
    results = score_episodes([Confident(1), Confident(1)], sampler, 12, None, "test")
    assert [r.diverged_episodes for r in results] == [0, 0, 0]
    assert results[2].accuracy == results[0].accuracy > 0


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


def test_eval_says_how_many_episodes_diverged_and_counts_them_wrong(cli, tiny_overrides, tmp_path):
    """algo.inner_lr=1e30 at test time: MAML's inner steps take every episode's logits to NaN, whose argmax
    (class 0) is right for 1 query in 5: that was printed as 20.00%, a chance-like accuracy."""
    run = tmp_path / "run"
    cli("train", *overrides_for("maml", tiny_overrides), "train.steps=1", f"hydra.run.dir={run}", cwd=tmp_path)
    for size in (1, 3):
        shown = cli("eval", f"run={run}", "algo.inner_lr=1e30", f"eval.batch_size={size}", cwd=tmp_path)
        line = (
            "test accuracy 0.00% ± 0.00 (10 episodes, omniglot 5-way 1-shot, best.pt) — 10 of 10 episodes "
            "diverged (non-finite predictions), counted as wrong"
        )
        assert line in shown.stdout
        assert "WARNING" in shown.stdout + shown.stderr
        assert "best.pt: 10 of 10 test episodes diverged" in shown.stdout + shown.stderr
    records = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [(r["accuracy"], r["diverged_episodes"], r["batch_size"]) for r in records] == [(0.0, 10, 1), (0.0, 10, 3)]
    assert [r["loss"] for r in records] == [None, None]
    shown = cli("eval", f"run={run}", cwd=tmp_path)  # the run's own inner_lr: nothing diverges, nothing is said
    assert "diverged" not in shown.stdout + shown.stderr
    record = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert record["diverged_episodes"] == 0 and record["accuracy"] > 0


def test_one_episode_set_for_every_batch_size_and_algorithm(cli, tiny_overrides, tiny_data, tmp_path):
    """120 test episodes scored 1, 7, 32 or 120 at a time (uneven last batches), by MAML and by ProtoNet in
    bf16 (device.amp=true, on any CPU): the same 120 tasks and the same score, to the last bit."""
    test = EpisodeSampler(load_split(tiny_data_config(tiny_data), "test"), 5, 1, 3, "cpu", seed=0)
    expected = hashlib.sha256(test.episode_ids(0, 120).numpy().tobytes()).hexdigest()
    for algo in ("maml", "protonet"):
        run = tmp_path / algo
        cli("train", *overrides_for(algo, tiny_overrides), "train.steps=1", f"hydra.run.dir={run}", cwd=tmp_path)
        for size in (1, 7, 32, 120):
            cli("eval", f"run={run}", "eval.episodes=120", f"eval.batch_size={size}", "device.amp=true", cwd=tmp_path)
        # the same run moved to another device: here the CPU named explicitly
        cli("eval", f"run={run}", "eval.episodes=120", "device=cpu", "device.amp=true", cwd=tmp_path)
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


@pytest.mark.parametrize("tasks", [4, 1])
@pytest.mark.parametrize("amp", ["false", "true"], ids=["float32", "bf16"])
@pytest.mark.parametrize("algo", ["maml", "reptile", "protonet", "finetune"])
def test_an_episode_scores_the_same_on_any_number_of_cores(algo, amp, tasks):
    """Evaluation runs each task on one core (the task threads), so its logits are the same bits on two
    cores as on one, in float32 and in bf16 (where a lone task runs on one core too): a score depends on
    neither the machine's core count nor how many tasks share its batch (eval.batch_size)."""
    steps = {"finetune": ["algo.head_steps=3"], "protonet": []}.get(algo, ["algo.inner_steps_eval=3"])
    cfg = compose([f"algo={algo}", f"task.ways={WAYS}", f"device.amp={amp}", *steps])
    batch = episodes(tasks=tasks, shots=1, queries=7, ways=WAYS, dtype=torch.float32)
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
