"""MLflow: the run's config as params, every metric per step, the final checkpoint as an artifact.

By default an SQLite store in the run folder (`mlflow ui --backend-store-uri
sqlite:///<run>/mlflow.db`), artifacts in <run>/mlartifacts; `tracking_uri=`
sends it to a server. A resumed run goes on in
the same MLflow run (its id is kept in <run>/mlflow_run_id); MLflow cannot
delete the records written after the checkpoint, so those steps appear twice.
"""

from pathlib import Path
from typing import Optional

from metalearn.loggers.base import MetricWriter, flat_config

RUN_ID_FILE = "mlflow_run_id"


class MLflowWriter(MetricWriter):
    def __init__(self, run_dir: Path, tracking_uri: Optional[str] = None, experiment: str = "metalearn"):
        import mlflow

        self.run_dir = Path(run_dir)
        local = tracking_uri is None
        self.client = mlflow.tracking.MlflowClient(
            tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        )
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            found = self.client.get_experiment_by_name(experiment)
            artifacts = (self.run_dir / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
            id_file.write_text(self.run_id)

    def start(self, config: dict) -> None:
        params = {k: str(v)[:500] for k, v in flat_config(config).items()}
        existing = self.client.get_run(self.run_id).data.params
        params = {k: v for k, v in params.items() if k not in existing}  # a resume may not change a param
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and value is not None:
                self.client.log_metric(self.run_id, f"{record['split']}/{key}", value, step=record["step"])

    def close(self) -> None:
        last = self.run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            self.client.log_artifact(self.run_id, str(last), artifact_path="checkpoints")
        self.client.set_terminated(self.run_id)
