"""train.keep_best=N keeps a run's N best validation checkpoints (best.pt, next_best/step-<step>.pt), through
a resume too, and `metalearn eval checkpoint=topN` scores their ensemble."""

import json
import math
import shutil

import pytest
import torch
from helpers.runs import assert_same_state, overrides_for

from metalearn.evaluate import EpisodeResult


def script(monkeypatch, accuracies):
    """Validations score these accuracies in turn (None: a non-finite loss), whatever the weights."""
    scripted = iter(accuracies)

    def fake_validation(algo, sampler, episodes, batch_size, desc, ranks):
        accuracy = next(scripted)
        loss = math.nan if accuracy is None else 1.0
        return EpisodeResult(accuracy=0.99 if accuracy is None else accuracy, ci95=0.01, loss=loss, episodes=episodes)

    monkeypatch.setattr("metalearn.hooks.run_episodes", fake_validation)


def expected_kept(run, n):
    """The steps of the n best validations in metrics.jsonl (finite loss; ties to the earlier step), best first."""
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]
    scored = [r for r in val if r["loss"] is not None and math.isfinite(r["loss"])]
    return [r["step"] for r in sorted(scored, key=lambda r: (-r["accuracy"], r["step"]))[:n]]


def kept(run):
    """(best.pt's step, the steps of next_best/), checking each file is a checkpoint of its step."""
    folder = run / "checkpoints"
    best = torch.load(folder / "best.pt", weights_only=True)["step"] if (folder / "best.pt").exists() else None
    others = []
    for path in sorted((folder / "next_best").glob("*"), key=lambda p: p.name):
        step = int(path.name.removeprefix("step-").removesuffix(".pt"))
        assert path.name == f"step-{step}.pt" and torch.load(path, weights_only=True)["step"] == step
        others.append(step)
    return best, sorted(others)


def weights(run, file):
    return torch.load(run / "checkpoints" / file, weights_only=True)["algo"]


def assert_same_files(a, b):
    """Two runs keep the same checkpoints, weights included."""
    assert kept(a) == kept(b)
    best, others = kept(a)
    for file in ["best.pt", *(f"next_best/step-{step}.pt" for step in others)]:
        assert_same_state(weights(a, file), weights(b, file), file)


@pytest.fixture
def eight_steps(tiny_overrides):
    """ProtoNet (the fastest to train), validated after every one of 8 steps, last.pt after each."""
    overrides = [o for o in overrides_for("protonet", tiny_overrides) if not o.startswith("train.")]
    return [*overrides, "train.meta_batch_size=1", "train.val_every=1", "train.ckpt_every=1", "train.log_every=8"]


def test_keep_best_keeps_the_n_best_validations(cli, eight_steps, tmp_path, monkeypatch, one_thread):
    # step:        1    2    3    4    5    6     7    8 ; step 6 scores higher but its loss is not finite
    script(monkeypatch, [0.5, 0.7, 0.6, 0.7, 0.9, None, 0.8, 0.6])
    run = tmp_path / "run"
    cli("train", *eight_steps, "train.steps=8", "train.keep_best=3", f"hydra.run.dir={run}", cwd=tmp_path)
    assert expected_kept(run, 3) == [5, 7, 2]  # 0.9, 0.8, then of the two 0.7s the earlier
    assert kept(run) == (5, [2, 7])
    # each file holds the weights of its own step: the second best is not a copy of the best
    with pytest.raises(AssertionError):
        assert_same_state(weights(run, "best.pt")["model"], weights(run, "next_best/step-7.pt")["model"])
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["kept_best"] == [
        {"step": 5, "val_accuracy": 0.9},
        {"step": 7, "val_accuracy": 0.8},
        {"step": 2, "val_accuracy": 0.7},
    ]
    assert last["best_val_accuracy"] == 0.9
    assert not list((run / "checkpoints").glob("**/*.tmp")) and not list((run / "checkpoints").glob("**/.*"))


def test_keep_best_default_is_best_and_last_only(cli, eight_steps, tmp_path, monkeypatch, one_thread):
    script(monkeypatch, [0.5, 0.7, 0.6, 0.4])
    run = tmp_path / "run"
    cli("train", *eight_steps, "train.steps=4", f"hydra.run.dir={run}", cwd=tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert kept(run) == (2, [])


# step:   1    2    3    4  |  5     6    7    8: after step 4, step 5 is the best and 6 enters the top 3
SCORES = [0.5, 0.9, 0.6, 0.3, 0.95, 0.7, 0.4, 0.2]


def test_keep_best_survives_a_resume(cli, eight_steps, tmp_path, monkeypatch, one_thread):
    """Stopped after step 4 and resumed to 8: the same files as a run straight to 8, weights included."""
    common = [*eight_steps, "train.keep_best=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    script(monkeypatch, SCORES)
    cli("train", *common, "train.steps=8", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert kept(straight) == (5, [2, 6]) and expected_kept(straight, 3) == [5, 2, 6]

    script(monkeypatch, SCORES)
    cli("train", *common, "train.steps=4", f"hydra.run.dir={split}", cwd=tmp_path)
    assert kept(split) == (2, [1, 3])
    cli("train", f"resume={split}", "train.steps=8", cwd=tmp_path)
    assert_same_files(split, straight)
    assert expected_kept(split, 3) == [5, 2, 6]


def test_a_resume_from_an_older_last_pt_removes_the_files_written_after_it(
    cli, eight_steps, tmp_path, monkeypatch, one_thread
):
    """A process killed after step 8's checkpoints but before last.pt was written again (here: last.pt of
    step 4 put back): best.pt is step 5's, steps 1 and 3 were deleted, step 6 is kept, none of which last.pt
    knows. Resuming puts step 2 back in best.pt, removes step 6's file, then ends as a straight run."""
    common = [*eight_steps, "train.keep_best=3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    script(monkeypatch, SCORES)
    cli("train", *common, "train.steps=8", f"hydra.run.dir={straight}", cwd=tmp_path)

    script(monkeypatch, SCORES + SCORES[4:])
    cli("train", *common, "train.steps=4", f"hydra.run.dir={crashed}", cwd=tmp_path)
    at_step_4 = tmp_path / "last-at-4.pt"
    shutil.copy(crashed / "checkpoints" / "last.pt", at_step_4)
    cli("train", f"resume={crashed}", "train.steps=8", cwd=tmp_path)
    shutil.copy(at_step_4, crashed / "checkpoints" / "last.pt")
    assert kept(crashed) == (5, [2, 6])

    cli("train", f"resume={crashed}", "train.steps=4", cwd=tmp_path)  # nothing to train: the files only
    assert kept(crashed) == (2, [])  # steps 1 and 3 are gone for good: the resumed run ranks anew from step 5
    assert_same_state(weights(crashed, "best.pt"), weights(straight, "next_best/step-2.pt"))
    cli("train", f"resume={crashed}", "train.steps=8", cwd=tmp_path)
    assert_same_files(crashed, straight)


def test_a_smaller_keep_best_on_resume_deletes_the_extra_files(cli, eight_steps, tmp_path, monkeypatch, one_thread):
    script(monkeypatch, SCORES)
    run = tmp_path / "run"
    cli("train", *eight_steps, "train.steps=4", "train.keep_best=3", f"hydra.run.dir={run}", cwd=tmp_path)
    assert kept(run) == (2, [1, 3])
    cli("train", f"resume={run}", "train.steps=4", "train.keep_best=2", cwd=tmp_path)
    assert kept(run) == (2, [3])


# --- metalearn eval checkpoint=topN ------------------------------------------------------------------------


def test_top_n_is_the_ensemble_of_those_checkpoints(cli, eight_steps, tmp_path, monkeypatch, one_thread):
    """checkpoint=top3 equals `run=[a,b,c]` of three copies of the run, each with one of the three as best.pt."""
    script(monkeypatch, SCORES)
    run = tmp_path / "run"
    cli("train", *eight_steps, "train.steps=8", "train.keep_best=3", f"hydra.run.dir={run}", cwd=tmp_path)
    out = cli("eval", f"run={run}", "checkpoint=top3", cwd=tmp_path).stdout.strip().splitlines()
    files = ["best.pt", "next_best/step-2.pt", "next_best/step-6.pt"]
    assert len(out) == 4
    for line, file in zip(out, files, strict=False):
        assert line.startswith("test accuracy") and line.endswith(f"1-shot, {file})")
    assert out[3].startswith("ensemble of the 3 best checkpoints: test accuracy")
    (record,) = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert record["checkpoint"] == "top3" and record["step"] is None
    assert [(m["checkpoint"], m["step"], m["val_accuracy"]) for m in record["members"]] == [
        ("best.pt", 5, 0.95),
        ("next_best/step-2.pt", 2, 0.9),
        ("next_best/step-6.pt", 6, 0.7),
    ]

    copies = []
    for i, file in enumerate(files):
        copy = tmp_path / f"member{i}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("evals.jsonl", "next_best"))
        shutil.copy(run / "checkpoints" / file, copy / "checkpoints" / "best.pt")
        copies.append(copy)
    cli("eval", f"run=[{','.join(map(str, copies))}]", cwd=tmp_path)
    explicit = [json.loads((copy / "evals.jsonl").read_text()) for copy in copies]
    for member, alone in zip(record["members"], explicit, strict=False):
        assert member["checkpoint_sha256"] == alone["checkpoint_sha256"] and member["step"] == alone["step"]
        assert (member["accuracy"], member["ci95"], member["loss"]) == (alone["accuracy"], alone["ci95"], alone["loss"])
    ensemble = explicit[0]["ensemble"]
    assert record["episode_digest"] == explicit[0]["episode_digest"]
    assert (record["accuracy"], record["ci95"]) == (ensemble["accuracy"], ensemble["ci95"])
    assert record["loss"] == pytest.approx(ensemble["loss"], rel=1e-12)


def test_top_n_of_a_run_that_keeps_fewer_is_an_error(cli, eight_steps, tmp_path, monkeypatch, one_thread):
    script(monkeypatch, SCORES[:4])
    run = tmp_path / "run"
    cli("train", *eight_steps, "train.steps=4", f"hydra.run.dir={run}", cwd=tmp_path)  # train.keep_best=1
    result = cli("eval", f"run={run}", "checkpoint=top3", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "keeps 1 (best.pt): it was trained with train.keep_best=1" in result.stderr
    assert "train.keep_best=3" in result.stderr and "checkpoint=top1" in result.stderr
    assert not (run / "evals.jsonl").exists()

    script(monkeypatch, SCORES[:2])
    short = tmp_path / "short"
    cli("train", *eight_steps, "train.steps=2", "train.keep_best=3", f"hydra.run.dir={short}", cwd=tmp_path)
    result = cli("eval", f"run={short}", "checkpoint=top3", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "keeps 2 (best.pt, next_best/step-1.pt)" in result.stderr
    assert "validated with a finite loss only 2 time(s)" in result.stderr and "resume=" in result.stderr

    result = cli("eval", f"run={run}", "checkpoint=top", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "choose best, last, or topN" in result.stderr
