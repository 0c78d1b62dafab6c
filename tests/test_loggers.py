"""TensorBoard and MLflow receive what metrics.jsonl receives: read back and compared.

A logger never costs a run: one that cannot start stops it before its data loads, with one clear
error; one that breaks later is switched off with a warning while metrics.jsonl goes on.
"""

import json
import socket
import time

import pytest
import torch
from helpers.runs import overrides_for
from hydra.utils import instantiate

from metalearn.loggers import MetricWriter

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


# A logger lost in the middle of a run (a server gone, a full disk) costs that logger, not the run.


class BrokenWriter(MetricWriter):
    """A logger whose `fail_in` method raises at its `fail_at`th call; records every call it gets."""

    calls: list = []

    def __init__(self, run_dir, fail_in: str = "write", fail_at: int = 1):
        self.fail_in, self.fail_at = fail_in, fail_at
        BrokenWriter.calls = []

    def _called(self, method):
        BrokenWriter.calls.append(method)
        if method == self.fail_in and BrokenWriter.calls.count(method) == self.fail_at:
            raise OSError(f"the store broke in {method}")

    def write(self, record):
        self._called("write")

    def start(self, config):
        self._called("start")

    def close(self):
        self._called("close")


def broken_logger(fail_in: str, fail_at: int = 1) -> str:
    return f"+loggers.broken={{_target_:{__name__}.BrokenWriter,fail_in:{fail_in},fail_at:{fail_at}}}"


def tiny_run(tiny_overrides, run, *more):
    return [*overrides_for("protonet", tiny_overrides), f"hydra.run.dir={run}", *more]


def assert_finished(run, result):
    """The run went on to its end: every record in metrics.jsonl, the last checkpoint saved."""
    steps = [(r["split"], r["step"]) for r in records(run)]
    assert steps == [("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4)], steps
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 4
    assert "run folder:" in result.stdout


def warnings_of(run, logger: str) -> list:
    return [line for line in (run / "train.log").read_text().splitlines() if f"logger={logger} failed" in line]


@pytest.mark.parametrize(("fail_in", "fail_at"), [("start", 1), ("write", 3), ("close", 1)])
def test_a_logger_that_breaks_is_switched_off_and_the_run_goes_on(cli, tiny_overrides, tmp_path, fail_in, fail_at):
    run = tmp_path / "run"
    result = cli("train", *tiny_run(tiny_overrides, run, broken_logger(fail_in, fail_at)), cwd=tmp_path)

    assert_finished(run, result)
    [warning] = warnings_of(run, "broken")
    assert f"the store broke in {fail_in}" in warning and "metrics.jsonl keeps every record" in warning
    calls = BrokenWriter.calls
    assert calls.count(fail_in) == fail_at and calls[-1] == fail_in, calls  # nothing more after it failed


def test_tensorboard_that_cannot_write_its_events_is_switched_off(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("a file where the event folder should go")
    result = cli("train", *tiny_run(tiny_overrides, run, "logger=tensorboard"), cwd=tmp_path)

    assert_finished(run, result)
    assert len(warnings_of(run, "tensorboard")) == 1


def test_mlflow_that_cannot_store_the_checkpoint_at_the_end_is_switched_off(cli, tiny_overrides, tmp_path, monkeypatch):
    import mlflow

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("the artifact store refused the upload")

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_artifact", refuse)
    run = tmp_path / "run"
    result = cli("train", *tiny_run(tiny_overrides, run, "logger=mlflow"), cwd=tmp_path)

    assert_finished(run, result)
    [warning] = warnings_of(run, "mlflow")
    assert "the artifact store refused the upload" in warning and "close" in warning
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "val/accuracy")] == [2, 4]
    assert client.get_run(run_id).info.status == "FINISHED", "the MLflow run is ended all the same"


# An MLflow server that does not answer: a clear error in seconds, before any data is loaded.


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def assert_refused_in_seconds(cli, tiny_overrides, tmp_path, uri, why, *more):
    run = tmp_path / "run"
    overrides = [o for o in tiny_run(tiny_overrides, run) if not o.startswith("data.root=")]
    missing = tmp_path / "no-data"  # loading the data first would fail on it instead
    began = time.monotonic()
    result = cli(
        "train",
        *overrides,
        f"data.root={missing}",
        "logger=mlflow",
        f"loggers.mlflow.tracking_uri={uri}",
        *more,
        cwd=tmp_path,
        check=False,
    )
    assert time.monotonic() - began < 30
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.strip()]
    assert error.startswith(f"metalearn: error: the MLflow server at loggers.mlflow.tracking_uri={uri} "), error
    assert why in error and "drop logger=mlflow" in error, error
    assert not run.exists(), "nothing of the refused run is left"


def test_an_mlflow_server_that_refuses_connections_stops_the_run_before_its_data_loads(cli, tiny_overrides, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    assert_refused_in_seconds(cli, tiny_overrides, tmp_path, uri, "Connection refused")


def test_an_mlflow_server_that_never_answers_stops_the_run_after_its_timeout(
    cli, tiny_overrides, tmp_path, silent_port
):
    uri = f"http://127.0.0.1:{silent_port}"
    assert_refused_in_seconds(cli, tiny_overrides, tmp_path, uri, "no answer within 2 s", "loggers.mlflow.timeout_s=2")


def test_loggers_write_nothing_for_a_run_refused_before_it_starts(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in tiny_run(tiny_overrides, run) if not o.startswith("data.root=")]
    result = cli(
        "train",
        *overrides,
        f"data.root={tmp_path / 'no-data'}",
        "logger=[tensorboard,mlflow]",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1 and "Omniglot not found" in result.stderr, result.stderr
    assert not run.exists(), "no MLflow store, run id or event file keeps the refused run's folder"


def test_an_mlflow_server_lost_mid_run_costs_seconds_not_minutes(tmp_path):
    import mlflow

    from metalearn.config.compose import compose

    node = compose(["logger=mlflow"]).loggers.mlflow  # the shipped timeout and retries
    writer = instantiate(node, run_dir=tmp_path)
    writer.client, writer.run_id = mlflow.tracking.MlflowClient(f"http://127.0.0.1:{closed_port()}"), "lost"
    began = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException, match="Connection refused"):
        writer.write({"step": 1, "split": "train", "loss": 1.0})
    assert time.monotonic() - began < 30
