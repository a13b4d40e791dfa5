"""Driver memory over a long run on tiny models: RSS at step 50 vs step 500 (goal: flat
within 5%), read back from the run's MLflow metrics. Usage: python benchmarks/driver_memory.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import history, models, run_recipe


def main(steps: int = 500) -> None:
    root = Path(tempfile.mkdtemp(prefix="rd-mem-"))
    m = models(root / "models", 512, teacher_hidden=32, student_hidden=32)
    raw = {
        "run": {"name": "memory", "output_dir": str(root / "runs")},
        "teachers": [{"name": "t", "model": m["teacher"], "num_cpus": 0.5}],
        "student": {"model": m["student"], "world_size": 1, "num_cpus": 0.5},
        "data": {"source": "synthetic", "seq_len": 32, "heldout": 4},
        "distill": {"top_k": 32, "prefetch_depth": 4},
        "train": {"steps": steps, "batch_size": 4, "micro_batch_size": 4, "log_every": 100},
        "checkpoint": {"every": 0},
    }
    rss = history(run_recipe(root / "recipe.yaml", raw), "driver_rss_mb")
    a, b = rss[50], rss[steps]
    print(f"driver RSS at step 50   {a:.1f} MiB")
    print(f"driver RSS at step {steps}  {b:.1f} MiB")
    print(f"ratio step {steps} / step 50  {b / a:.3f}  (goal within 1.05)")


if __name__ == "__main__":
    main()
