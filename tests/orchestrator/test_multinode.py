"""Placement on a real multi-node Ray (three nodes on 127.0.0.1, in a subprocess): teacher
replicas land on the node offering `teacher_node`, the student ranks (one placement group)
on the node offering `student_node`; placements the cluster cannot hold are refused with one
line, and so is a run directory a node cannot see."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import base_recipe, run_multinode


@pytest.mark.slow
def test_actors_land_where_the_recipe_asks(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    raw = base_recipe(
        tmp_path,
        tiny_models,
        train={"steps": 3, "batch_size": 4, "micro_batch_size": 2, "log_every": 1},
    )
    raw["teachers"][0].update(replicas=2, num_cpus=0.25, resources={"teacher_node": 1})
    raw["student"].update(num_cpus=0.25, resources={"student_node": 1}, world_size=2)
    out, _ = run_multinode(raw, tmp_path)
    nodes = out["nodes"]
    assert len(set(nodes.values())) == 3
    assert out["steps"] == 3
    teachers, students = out["placement"]["teacher tiny"], out["placement"]["student student"]
    assert [t["node"] for t in teachers] == [nodes["teacher_node"]] * 2
    assert [s["node"] for s in students] == [nodes["student_node"]] * 2
    # the teacher is a known model name: each node loads its own cache's copy
    assert [t["model"] for t in teachers] == [out["teacher_node_cache"]] * 2
    assert out["driver_cache"] != out["teacher_node_cache"]
    refusals = out["refusals"]
    assert "needs 3 student_node at once" in refusals["too_many"]
    assert "has 2" in refusals["too_many"]
    assert refusals["strict_pack"].startswith("student.placement: strict_pack puts all 2 ranks")
    assert refusals["unreachable"].startswith("run.output_dir: ")
    assert "is not visible from node 127.0.0.1" in refusals["unreachable"]
