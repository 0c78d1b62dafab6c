"""TensorBoard and MLflow receive what metrics.jsonl receives: read back and compared."""

import json

import pytest

from helpers.runs import overrides_for

pytest.importorskip("tensorboard", reason="the loggers extra: pip install '.[loggers]'")
pytest.importorskip("mlflow", reason="the loggers extra: pip install '.[loggers]'")


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run) -> dict:
    scalars = {}
    for record in records(run):
        for key, value in record.items():
            if key not in ("step", "split"):
                scalars.setdefault(f"{record['split']}/{key}", []).append((record["step"], value))
    return scalars


def tensorboard_scalars(run) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_and_mlflow_hold_the_metrics_also_after_a_resume(cli, tiny_overrides, tmp_path):
    import mlflow

    run = tmp_path / "run"
    overrides = [*overrides_for("protonet", tiny_overrides), "logger=[tensorboard,mlflow]", f"hydra.run.dir={run}"]
    cli("train", *overrides, "train.steps=2", cwd=tmp_path)
    cli("train", f"resume={run}", "train.steps=4", cwd=tmp_path)

    expected, logged = expected_scalars(run), tensorboard_scalars(run)
    assert set(expected) <= set(logged)
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag  # the resume purged nothing twice
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    params = client.get_run(run_id).data.params
    assert params["algo.name"] == "protonet" and params["train.steps"] == "2"  # the params of the run's start
    history = {(m.step, m.value) for m in client.get_metric_history(run_id, "val/accuracy")}
    assert set(expected["val/accuracy"]) <= history
    assert any((run / "mlartifacts").rglob("last.pt")), "the final checkpoint is an artifact"
