"""MLflow tracking: one run per job, the recipe as params and artifact, buffered metrics.

We talk to MLflow only through an explicit MlflowClient, never `set_tracking_uri`, so no
tracking URI leaks into the environment of actor processes. Metrics are written by a
background thread, so a slow store never holds up the control loop.
"""

from __future__ import annotations

import re
import threading
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
        self, uri: str, experiment: str, artifact_root: Path, run_name: str, run_id: str | None
    ) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = (artifact_root / experiment).resolve().as_uri()
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._buffer: list[Metric] = []
        self._lock = threading.Lock()  # guards _buffer
        self._write_lock = threading.Lock()  # one writer at a time
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._writer, name="mlflow-writer", daemon=True)
        self._thread.start()

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue metrics; the background writer sends them every few seconds."""
        now = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            if len(self._buffer) >= 500:
                self._wake.set()

    def _writer(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            try:
                self._write()
            except Exception as exc:  # surfaced by the next flush()
                self._error = exc

    def _write(self) -> None:
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def flush(self) -> None:
        """Everything logged so far is in the store when this returns."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._write()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str) -> None:
        """FINISHED, KILLED (stopped, resumable) or FAILED."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
