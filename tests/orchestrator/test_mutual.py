"""distill.mode: mutual — two tiny students of different sizes, each its own DeepSpeed
group, learn the toy language together from each other (no teacher), each with its own
metrics and export."""

from __future__ import annotations

import json

from conftest import base_recipe, write_recipe
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from actors.models import save_tiny_llama
from orchestrator.cli import main


def test_two_students_learn_from_each_other(ray_session, tiny_models, tmp_path):
    peer = save_tiny_llama(str(tmp_path / "peer"), seed=4, hidden=48, layers=1)
    raw = base_recipe(
        tmp_path,
        tiny_models,
        distill={"mode": "mutual", "top_k": 16, "alpha": 0.5, "loss": "forward_kl"},
        train={"steps": 30, "lr": 0.02},
        mutual={"peers": [{"name": "peer", "model": peer, "num_cpus": 0.25}]},
    )
    raw["teachers"] = []
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 0
    (run_dir,) = (tmp_path / "runs").glob("t-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    # both get closer to the toy language: held-out perplexity on its text falls for each
    assert after["ppl"] < 0.8 * before["ppl"]
    assert after["peer/ppl"] < 0.8 * before["peer/ppl"]
    for folder in (run_dir / "student", run_dir / "peer"):
        AutoModelForCausalLM.from_pretrained(folder)  # each student is exported
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / "state.json").read_text())["run_id"]
    keys = set(client.get_run(run_id).data.metrics)
    assert {"loss", "kl/peer", "peer/loss", "peer/kl/student", "eval/peer/ppl"} <= keys
    # each student's KL to the other is a real, finite, positive number
    kl = [m.value for m in client.get_metric_history(run_id, "peer/kl/student")]
    assert len(kl) == 30 and all(0 < v < 50 for v in kl)


def test_mutual_run_resumes_every_student(ray_session, tiny_models, tmp_path):
    """Stopped and resumed, a mutual run ends where an uninterrupted one does, for the
    first student and for the peer (each has its own checkpoint)."""
    import torch
    from safetensors.torch import load_file

    peer = save_tiny_llama(str(tmp_path / "peer"), seed=4, hidden=48, layers=1)
    raw = base_recipe(
        tmp_path,
        tiny_models,
        distill={"mode": "mutual", "top_k": 16, "alpha": 0.5},
        train={"steps": 6},
        student={"world_size": 2},  # peers train on the main group's shards
        checkpoint={"every": 3},
        mutual={"peers": [{"name": "peer", "model": peer, "world_size": 2, "num_cpus": 0.25}]},
    )
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    for out in (full_dir, part_dir):
        raw["run"]["output_dir"] = str(out)
        path = write_recipe(tmp_path, raw, f"{out.name}.yaml")
        args = ["run", str(path)] + (["--stop-after", "3"] if out == part_dir else [])
        assert main(args) == 0
    (full,) = full_dir.glob("t-*")
    (part,) = part_dir.glob("t-*")
    assert not (part / "peer").exists()
    assert main(["resume", str(part)]) == 0
    for name in ("student", "peer"):
        a = load_file(str(full / name / "model.safetensors"))
        b = load_file(str(part / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
