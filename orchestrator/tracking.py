"""MLflow tracking: one run per job, the recipe as params and artifact, buffered metrics.

We talk to MLflow only through an explicit MlflowClient, never `set_tracking_uri`, so no
tracking URI leaks into the environment of actor processes. Metrics are held until their
step is final (a checkpoint commits it, or the run ends), so a step that a fault rolls back
and trains again has one row, not two; the console shows every step live.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def default_tracking_uri(output_dir: str) -> str:
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|credential)", re.I)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """Credentials in URIs (`scheme://user:pass@host`) become `***@`."""
    return _URI_USERINFO.sub("***@", text)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists by index. Secrets never reach MLflow: values of
    keys that name one (token, secret, password, api key) are masked, URIs lose their
    credentials."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        leaf = prefix.rsplit(".", 1)[-1]
        return {prefix: "***" if _SECRET_KEY.search(leaf) else redact(str(tree))[:500]}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class Tracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: Path,
        run_name: str,
        run_id: str | None,
        parent_run_id: str | None = None,
    ) -> None:
        """`parent_run_id`: a stage of a staged run is a nested run of the run's own."""
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = (artifact_root / experiment).resolve().as_uri()
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._pending: list[Metric] = []

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Held until `commit`: a step a restore rolls back is trained and logged again, and
        only its final row reaches MLflow (one row per step)."""
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def commit(self) -> None:
        """Write every row held so far; called once a checkpoint (or the run's end) makes
        their steps final, before the ledger records the checkpoint."""
        batch, self._pending = self._pending, []
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def discard(self) -> int:
        """Drop the rows of steps that will be trained again (a restore, a failed run that
        a resume continues); returns how many."""
        dropped, self._pending = len(self._pending), []
        return dropped

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str) -> None:
        """FINISHED, KILLED (stopped, resumable) or FAILED. Rows of steps past the last
        checkpoint of a run that did not finish are dropped: a resume trains them again."""
        if status == "FINISHED":
            self.commit()
        else:
            self.discard()
        self.client.set_terminated(self.run_id, status=status)
