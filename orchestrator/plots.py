"""PNG plots of a run's curves, read back from MLflow (what people would rather see)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def metric_curve(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    rows = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in rows], [m.value for m in rows]


def plot_curves(runs: dict[str, tuple[MlflowClient, str]], keys: list[str], path: Path) -> Path:
    """One panel per metric key, one line per labelled run."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, (client, run_id) in runs.items():
            steps, values = metric_curve(client, run_id, key)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 5 else None)
        ax.set_title(key)
        if "ppl" in key:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
