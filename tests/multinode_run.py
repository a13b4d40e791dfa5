"""Runs in its own process (a `ray.cluster_utils.Cluster` cannot share the pytest session's
Ray): a head and two worker nodes on 127.0.0.1, one offering `teacher_node`, one
`student_node`; a tiny recipe run on them; prints where every actor landed as JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys
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


if __name__ == "__main__":
    main(sys.argv[1])
