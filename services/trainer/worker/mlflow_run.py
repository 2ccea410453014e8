"""A job's run in MLflow, logged from rank 0 when a tracking URI is configured.

MLflow is optional (the `mlflow` extra) and imported only here, only then. One MLflow run per job,
found again by its `dreambooth.job_id` tag, so a resumed job continues the same run. Metrics are
buffered and sent in batches (at most every BATCH_SECONDS, and at checkpoints and the end), so a
remote tracking server costs no call per step. A tracking server that fails is logged and left
alone for the rest of the attempt: MLflow never fails a training run. Nothing phones home: MLflow's
usage telemetry is switched off before it is imported.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from services.common.errors import FailedPrecondition
from services.trainer.settings import TrackingSettings

log = logging.getLogger(__name__)

JOB_TAG = "dreambooth.job_id"
BATCH_SECONDS = 10.0
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def mlflow_client(tracking_uri: str) -> Any:
    """An `MlflowClient` for `tracking_uri`, with telemetry off; FailedPrecondition without mlflow."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if tracking_uri.startswith("file:"):
        # MLflow 3 refuses its file store unless allowed; a file: URI is that choice, made explicitly.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FailedPrecondition(
            "MLflow tracking is configured (DREAMBOOTH_TRAINER_MLFLOW_TRACKING_URI) but mlflow is not "
            "installed where the training workers run: install dreambooth-service[mlflow] there"
        ) from None
    try:  # mlflow imported earlier in this process may have started its telemetry: stop it
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()
    except ImportError:
        pass
    return MlflowClient(tracking_uri=tracking_uri)


class MlflowRun:
    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._pending: list[Any] = []
        self._last_sent = time.monotonic()
        self._broken = False

    @classmethod
    def open(cls, settings: TrackingSettings, job_id: str, params: dict[str, Any]) -> MlflowRun | None:
        """The job's run (created, or found again on resume) with `params` logged; None when the
        tracking server cannot be reached (logged)."""
        client = mlflow_client(settings.mlflow_tracking_uri)
        try:
            name = settings.mlflow_experiment
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'")
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                run_id = client.create_run(experiment_id, run_name=job_id, tags={JOB_TAG: job_id}).info.run_id
            from mlflow.entities import Param

            values = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
            client.log_batch(run_id, params=values)
        except Exception:
            log.warning("MLflow is unavailable for this run", exc_info=True, extra={"job_id": job_id})
            return None
        return cls(client, run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if time.monotonic() - self._last_sent >= BATCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._last_sent = time.monotonic()
        if self._broken or not pending:
            return
        try:
            for start in range(0, len(pending), MAX_BATCH):
                self.client.log_batch(self.run_id, metrics=pending[start : start + MAX_BATCH])
        except Exception:
            self._broken = True
            log.warning("MLflow logging failed; it stops for this run", exc_info=True)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED (a cancel)."""
        self.flush()
        if self._broken:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:
            log.warning("MLflow could not end the run", exc_info=True)
