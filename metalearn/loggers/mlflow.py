"""MLflow: the run's config as params, every metric per step, the final checkpoint as an artifact.

By default an SQLite store in the run folder (`mlflow ui --backend-store-uri
sqlite:///<run>/mlflow.db`), artifacts in <run>/mlartifacts; `tracking_uri=`
sends it to a server. A resumed run goes on in
the same MLflow run (its id is kept in <run>/mlflow_run_id); MLflow cannot
delete the records written after the checkpoint, so those steps appear twice.

A server is asked once, without retries, when the writer is built: one that does not answer stops
the run before its data is loaded. Every later request waits at most `timeout_s` seconds and is
retried `retries` times (MLflow's own defaults wait minutes), so a server lost in the middle of a
run costs seconds before the logger is switched off.
"""

import os
import re
from contextlib import contextmanager
from pathlib import Path

from metalearn.errors import MetalearnError
from metalearn.loggers.base import MetricWriter, flat_config

RUN_ID_FILE = "mlflow_run_id"


def is_server(tracking_uri: str | None) -> bool:
    return tracking_uri is not None and tracking_uri.split(":", 1)[0].lower() in ("http", "https")


@contextmanager
def mlflow_http(settings: dict[str, str]):
    """MLflow reads its HTTP retries and timeout from the environment at each request."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def unreachable(err: BaseException | None, timeout_s: int) -> str | None:
    """Why the server did not answer ("Connection refused", "no answer within 10 s"), None if it did answer."""
    import requests

    while err is not None:
        if isinstance(err, requests.exceptions.SSLError):  # it answered, but its certificate is refused
            return None
        if isinstance(err, (requests.exceptions.Timeout, requests.exceptions.ConnectionError)):
            # Without retries, requests reports a read timeout as a plain ConnectionError.
            if isinstance(err, requests.exceptions.Timeout) or "timed out" in str(err):
                return f"no answer within {timeout_s} s"
            errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
            return errno.group(1).strip() if errno else "cannot connect"
        err = err.__cause__ or err.__context__
    return None


class MLflowWriter(MetricWriter):
    def __init__(
        self,
        run_dir: Path,
        tracking_uri: str | None = None,
        experiment: str = "metalearn",
        timeout_s: int = 10,
        retries: int = 2,
    ):
        import mlflow

        self.run_dir = Path(run_dir)
        self.tracking_uri, self.experiment = tracking_uri, experiment
        # MLflow reads both as whole numbers.
        if not (isinstance(timeout_s, int) and timeout_s >= 1 and isinstance(retries, int) and retries >= 0):
            raise MetalearnError(
                f"loggers.mlflow.timeout_s={timeout_s} and loggers.mlflow.retries={retries}: choose whole numbers, "
                f"timeout_s >= 1 (seconds) and retries >= 0."
            )
        self.timeout_s = timeout_s
        self.http = {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        }
        self.client = None
        self.run_id: str | None = None
        if is_server(tracking_uri):
            self.client = mlflow.tracking.MlflowClient(tracking_uri)
            self.check_server()
        # The MLflow run and a local store's files are made in start(): a run stopped before it starts has none.

    def check_server(self) -> None:
        try:
            with mlflow_http({**self.http, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}):
                self.client.get_experiment_by_name(self.experiment)
        except Exception as err:
            why = unreachable(err, self.timeout_s)
            if why is None:
                raise
            raise MetalearnError(
                f"the MLflow server at loggers.mlflow.tracking_uri={self.tracking_uri} cannot be reached ({why}). "
                f"Start the server, fix loggers.mlflow.tracking_uri, or drop logger=mlflow "
                f"(metrics.jsonl holds every metric either way)."
            ) from None

    def open_run(self) -> None:
        import mlflow

        local = self.tracking_uri is None
        if self.client is None:
            self.client = mlflow.tracking.MlflowClient(
                self.tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
            )
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            found = self.client.get_experiment_by_name(self.experiment)
            artifacts = (self.run_dir / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment, artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
            id_file.write_text(self.run_id)

    def start(self, config: dict) -> None:
        with mlflow_http(self.http):
            self.open_run()
            params = {k: str(v)[:500] for k, v in flat_config(config).items()}
            existing = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in existing}  # a resume may not change a param
            for key, value in params.items():
                self.client.log_param(self.run_id, key, value)

    def write(self, record: dict) -> None:
        with mlflow_http(self.http):
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and value is not None:
                    self.client.log_metric(self.run_id, f"{record['split']}/{key}", value, step=record["step"])

    def close(self) -> None:
        if self.run_id is None:
            return
        with mlflow_http(self.http):
            last = self.run_dir / "checkpoints" / "last.pt"
            try:
                if last.is_file():
                    self.client.log_artifact(self.run_id, str(last), artifact_path="checkpoints")
            finally:  # a failed upload still ends the MLflow run, or it would show as running forever
                self.client.set_terminated(self.run_id)
