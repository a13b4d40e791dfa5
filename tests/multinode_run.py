"""Runs in its own process (a `ray.cluster_utils.Cluster` cannot share the pytest session's
Ray), nodes on 127.0.0.1, in one of two ways:

- `multinode_run.py RECIPE.json`: a head and two worker nodes, one offering `teacher_node`,
  one `student_node`; a tiny recipe runs on them; prints where every actor landed as JSON.
- `multinode_run.py --node-loss [--base] RECIPE.json`: a head and one worker node, both
  offering `worker` (the head enough for every actor); once the run commits its first
  checkpoint, the worker node, which hosts a teacher replica and a student rank, is killed
  (SIGKILL of its raylet and everything on it, as a lost machine). Prints the run's wall
  time, MLflow `loss` rows per step and where the actors were before and after. `--base`:
  first the same recipe uninterrupted on the same cluster (for the seconds lost).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from ray.cluster_utils import Cluster

from actors.model_store import MARKER
from orchestrator.driver import execute, new_run_dir
from orchestrator.placement import check_reachable
from orchestrator.preflight import preflight
from orchestrator.recipe import Recipe, RecipeError

KNOWN = "smollm2-135m-instruct"
NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 256 * 2**20}


def _cache_with(teacher: str, root: Path) -> Path:
    """A model cache holding the tiny teacher under a known model name (as if fetched)."""
    folder = root / KNOWN
    shutil.copytree(teacher, folder)
    (folder / MARKER).write_text(json.dumps({"name": KNOWN}))
    return folder


def main(raw_path: str) -> None:
    raw = json.loads(Path(raw_path).read_text())
    # the teacher by known name: the driver and the teacher node each have their own cache
    work = Path(raw["run"]["output_dir"]).parent
    driver_copy = _cache_with(raw["teachers"][0]["model"], work / "driver_cache")
    node_copy = _cache_with(raw["teachers"][0]["model"], work / "node_cache")
    raw["teachers"][0]["model"] = KNOWN
    os.environ["RAYDISTILL_MODELS"] = str(driver_copy.parent)
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 1})
    os.environ["RAYDISTILL_MODELS"] = str(node_copy.parent)  # the node inherits it
    teacher_node = cluster.add_node(**NODE, num_cpus=1, resources={"teacher_node": 2})
    os.environ["RAYDISTILL_MODELS"] = str(driver_copy.parent)
    student_node = cluster.add_node(**NODE, num_cpus=1, resources={"student_node": 2})
    cluster.wait_for_nodes()
    out: dict = {
        "driver_cache": str(driver_copy.resolve()),
        "teacher_node_cache": str(node_copy.resolve()),
        "nodes": {
            "head": cluster.head_node.node_id,
            "teacher_node": teacher_node.node_id,
            "student_node": student_node.node_id,
        },
    }
    raw["cluster"] = {"address": cluster.address}
    recipe = preflight(Recipe.model_validate(raw))
    run_dir = new_run_dir(recipe)
    result = execute(recipe, run_dir)
    out["steps"] = result.steps_done
    out["placement"] = json.loads((run_dir / "placement.json").read_text())
    import ray  # still connected: execute leaves a Ray it joined running

    refusals = {}
    try:  # three ranks asking for student_node: the cluster has two
        raw["student"] = {**raw["student"], "world_size": 3}
        raw["train"] = {**raw["train"], "batch_size": 6, "micro_batch_size": 2}
        from orchestrator.placement import check_resources

        check_resources(Recipe.model_validate(raw))
    except RecipeError as exc:
        refusals["too_many"] = str(exc)
    try:
        raw["student"] = {**raw["student"], "world_size": 2, "placement": "strict_pack"}
        raw["student"]["resources"] = {}
        raw["student"]["num_cpus"] = 0.75
        raw["train"] = {**raw["train"], "batch_size": 8}
        check_resources(Recipe.model_validate(raw))
    except RecipeError as exc:
        refusals["strict_pack"] = str(exc)
    try:
        check_reachable(Path(raw["run"]["output_dir"]) / "no-such-run")
    except RecipeError as exc:
        refusals["unreachable"] = str(exc)
    out["refusals"] = refusals
    ray.shutdown()
    cluster.shutdown()
    print("RESULT_JSON " + json.dumps(out), flush=True)


def _rows_per_step(summary: dict) -> dict[int, int]:
    """How many MLflow `loss` rows each step has (exactly one each, when nothing is lost)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    rows = client.get_metric_history(summary["mlflow_run_id"], "loss")
    return dict(sorted(Counter(m.step for m in rows).items()))


def _kill_node_after_checkpoint(cluster: Cluster, node, run_dir: Path, out: dict) -> None:
    """Once a checkpoint is committed (a rank lost can then be restored), note where the
    actors are and SIGKILL the node's processes: no graceful drain, as a machine that dies."""
    ledger = run_dir / "checkpoints" / "latest.json"
    while not ledger.exists():
        time.sleep(0.05)
    out["placement_before"] = json.loads((run_dir / "placement.json").read_text())
    out["killed_after_step"] = json.loads(ledger.read_text())["step"]
    cluster.remove_node(node, allow_graceful=False)
    out["killed_at"] = time.perf_counter()


def _timed_run(raw: dict, name: str, kill=None) -> dict:
    """One run of `raw`; `kill(run_dir, out)`, if given, runs beside it in a thread."""
    from orchestrator.driver import execute, new_run_dir
    from orchestrator.preflight import preflight

    recipe = preflight(Recipe.model_validate({**raw, "run": {**raw["run"], "name": name}}))
    run_dir = new_run_dir(recipe)
    out: dict = {"run_dir": str(run_dir)}
    thread = None
    if kill is not None:
        thread = threading.Thread(target=kill, args=(run_dir, out), daemon=True)
        thread.start()
    start = time.perf_counter()
    result = execute(recipe, run_dir)
    out["wall_s"] = time.perf_counter() - start
    if "killed_at" in out:
        out["killed_at"] -= start
    out["steps"] = result.steps_done
    out["rows_per_step"] = _rows_per_step(result.summary)
    out["placement_after"] = json.loads((run_dir / "placement.json").read_text())
    out["student_dir"] = result.summary["student_dir"]
    return out


def node_loss(raw_path: str, with_base: bool) -> None:
    raw = json.loads(Path(raw_path).read_text())
    start = time.perf_counter()
    # the head (the driver's node) survives, with room for every actor once alone
    head = {**NODE, "num_cpus": 4, "resources": {"worker": 4}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    doomed = cluster.add_node(**NODE, num_cpus=2, resources={"worker": 2})
    cluster.wait_for_nodes()
    raw["cluster"] = {**raw.get("cluster", {}), "address": cluster.address}
    out: dict = {
        "nodes": {"survivor": cluster.head_node.node_id, "doomed": doomed.node_id},
        "cluster_start_s": time.perf_counter() - start,
    }
    import ray

    try:
        if with_base:
            out["base"] = _timed_run(raw, "base")
        out["node_loss"] = _timed_run(
            raw,
            "nodeloss",
            lambda run_dir, o: _kill_node_after_checkpoint(cluster, doomed, run_dir, o),
        )
    finally:  # no Ray left behind for the next test to join
        ray.shutdown()
        cluster.shutdown()
    print("RESULT_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--node-loss":
        node_loss(sys.argv[-1], with_base="--base" in sys.argv[2:-1])
    else:
        main(sys.argv[1])
