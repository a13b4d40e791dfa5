"""MLflow tracking: one run per job, the recipe as params and artifact, buffered metrics.

We talk to MLflow only through an explicit MlflowClient, never `set_tracking_uri`, so no
tracking URI leaks into the environment of actor processes. Metrics are held until their
step is final (a checkpoint commits it, or the run ends), so a step that a fault rolls back
and trains again has one row, not two; the console shows every step live. A checkpoint
keeps its rows beside its shards and they reach MLflow after the ledger: a crash before the
ledger loses nothing MLflow has, a crash after it is repaired on resume by logging the
checkpoint's rows again, minus those MLflow already holds (one row per step and metric).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.credentials import redact, redact_uri, reveal


def default_tracking_uri(output_dir: str) -> str:
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///path` URI (None for an in-memory or non-sqlite store)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix) :].split("?", 1)[0])


def _empty_store() -> Path:
    """An empty store of this MLflow version, made once per machine: its tables without the
    Default experiment, whose artifact location MLflow derives from where it is opened
    (every store opened from a copy gets its own, as a new file would)."""
    import sqlite3

    import mlflow

    cache = Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill"))
    template = cache / "mlflow" / f"empty-{mlflow.__version__}.db"
    if template.is_file():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments(max_results=1)
        with sqlite3.connect(partial) as con:
            con.execute("DELETE FROM experiments")
        con.close()
        os.replace(partial, template)
    finally:
        partial.unlink(missing_ok=True)
    return template


def seed_store(uri: str) -> None:
    """A new local sqlite store starts as a copy of an empty one: creating its tables runs
    MLflow's ~70 schema migrations, ~1.5 s of CPU for every new output folder. A store that
    exists, or appears meanwhile (a run beside ours), is left as it is."""
    path = _sqlite_path(uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        shutil.copyfile(_empty_store(), partial)
        os.link(partial, path)  # never over a store that appeared meanwhile
    except Exception:  # noqa: BLE001 - there already, or no cache or links here: MLflow
        pass  # makes the tables itself
    finally:
        partial.unlink(missing_ok=True)


def prepare_store(uri: str) -> threading.Thread | None:
    """Open a local sqlite store in the background while the actors start (a new file is
    seeded from an empty one). It creates no experiment and no run, so a refused run still
    leaves no MLflow run; an error is left for the Tracker to report. Other stores are
    opened by the Tracker (a server's client retries for minutes)."""
    if not uri.startswith("sqlite:"):
        return None
    # its INFO lines about creating tables: nothing to act on, and a refused run's one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    def open_store() -> None:
        try:
            seed_store(uri)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - reported, with context, by the Tracker
            pass

    thread = threading.Thread(target=open_store, name="mlflow-store", daemon=True)
    thread.start()
    return thread


_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key|credential)", re.I)


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
        seed_store(reveal(uri))
        self.client = MlflowClient(tracking_uri=reveal(uri))  # the only holder of a password
        self.uri = redact_uri(uri)  # what summary.json and the console show
        if reveal(uri) != self.uri:  # else MLflow prints its URL, password and all, at the end
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        resumed = run_id is not None
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
        self._logged = self._last_steps() if resumed else {}

    def _last_steps(self) -> dict[str, int]:
        """Per metric, the last step MLflow holds. Rows reach MLflow in step order, each
        step once, so a row at or below it is already there (a resume replays such rows)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {
            k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys
        }

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

    def pending_rows(self) -> list[list[Any]]:
        """The rows held so far, as JSON: a checkpoint keeps them until MLflow has them."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self._pending]

    def replay(self, rows: list[list[Any]]) -> None:
        """Log a checkpoint's rows (`pending_rows`) that MLflow does not hold yet: those of a
        crash between the ledger and MLflow."""
        self._pending[:0] = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows]
        self.commit()

    def commit(self) -> None:
        """Write every row held so far that MLflow does not hold yet; called once the ledger
        (or the run's end) made their steps final."""
        batch, self._pending = self._pending, []
        new = [m for m in batch if m.step > self._logged.get(m.key, -1)]
        for i in range(0, len(new), 1000):
            self.client.log_batch(self.run_id, metrics=new[i : i + 1000])
            for m in new[i : i + 1000]:
                self._logged[m.key] = max(m.step, self._logged.get(m.key, -1))

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

    def register_model(self, name: str, artifact_path: str, tags: dict[str, str]) -> str:
        """A version of registered model `name` from this run's `artifact_path`; the
        version this run already registered, if any (a repeated end registers once)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for mv in self.client.search_model_versions(f"name = '{name}'"):
            if mv.run_id == self.run_id:
                return str(mv.version)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        return str(self.client.create_model_version(name, source, self.run_id, tags).version)

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
