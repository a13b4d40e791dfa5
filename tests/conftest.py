"""Shared fixtures: one Ray instance per test session, tiny models built from code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Everything on loopback: Ray reads this when it is imported (not yet: conftest comes first)
# and then gives the local node 127.0.0.1; the students' gloo group binds to `lo`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 cores: actors take fractional CPUs)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny teacher (2 layers) and a tiny student (1 layer) with the same vocab."""
    from actors.models import save_tiny_llama

    root = tmp_path_factory.mktemp("models")
    teacher = save_tiny_llama(str(root / "teacher"), seed=1, hidden=48, layers=2)
    _teach_markov_chain(teacher)
    return {
        "teacher": teacher,
        "student": save_tiny_llama(str(root / "student"), seed=2, hidden=32, layers=1),
        "other_vocab": save_tiny_llama(str(root / "other"), seed=3, vocab_size=80),
    }


@pytest.fixture(scope="session")
def chat_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The tiny teacher and student with a real (char-level) tokenizer saved beside them."""
    import shutil

    from chat_tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("chat_models")
    out = {}
    for name in ("teacher", "student"):
        path = root / name
        shutil.copytree(tiny_models[name], path)
        build_tokenizer("smollm").save_pretrained(path)
        out[name] = str(path)
    return out


def base_recipe(tmp_path: Path, models: dict[str, str], **sections: Any) -> dict[str, Any]:
    """One student rank: every rank is a process that imports torch, transformers and
    DeepSpeed (~8 s of CPU). Tests about ranks (ZeRO, rank faults, exact resume, the
    data-parallel gradient) ask for two."""
    recipe: dict[str, Any] = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "teachers": [{"name": "tiny", "model": models["teacher"], "num_cpus": 0.25}],
        "student": {"model": models["student"], "world_size": 1, "num_cpus": 0.25},
        "data": {
            "source": "synthetic",
            "seq_len": 32,
            "heldout": 8,
            "synthetic": {"num_sequences": 128},
        },
        "distill": {"top_k": 16, "loss": "forward_kl"},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "micro_batch_size": 2,
            "lr": 0.01,
            "warmup_steps": 3,
            "log_every": 10,
        },
        "checkpoint": {"every": 0},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def write_recipe(tmp_path: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _teach_markov_chain(path: str, steps: int = 150) -> None:
    """Fit the tiny teacher to the synthetic toy language, so it has a sharp, learnable
    distribution for students to match (a random teacher is nearly uniform)."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.data import synthetic_dataset
    from orchestrator.recipe import DataConfig

    data = synthetic_dataset(
        DataConfig(seq_len=32, heldout=8, synthetic={"num_sequences": 128}), 96, seed=0
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.from_numpy(data.train.input_ids.astype("int64"))
    torch.manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(ids), (32,))
        loss = model(input_ids=ids[rows], labels=ids[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)


def run_multinode(raw: dict[str, Any], tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    """`tests/multinode_run.py FLAGS RECIPE` in its own process (a `ray.cluster_utils`
    cluster of local nodes; its own Ray, authentication off): its RESULT_JSON and stdout."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    raw_path = tmp_path / "recipe.json"
    raw_path.write_text(json.dumps(raw))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": f"{root}:{root / 'tests'}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "multinode_run.py"), *flags, str(raw_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT_JSON ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULT_JSON ")), proc.stdout


def titles_during(gone: set[str], run: Any) -> tuple[Any, set[str]]:
    """Run `run()` while sampling the titles of Ray's worker processes (`ray::TeacherActor`),
    once the actors of earlier runs, parked ones included, are killed and processes with
    the titles in `gone` have exited."""
    import threading
    import time

    import psutil

    from orchestrator import warm

    warm.release()

    def titles() -> set[str]:
        out = set()
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::"):
                out.add(cmd.split()[0].split(".")[0])
        return out

    deadline = time.monotonic() + 60
    while gone & titles() and time.monotonic() < deadline:
        time.sleep(0.2)
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(titles())
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        return run(), seen
    finally:
        stop.set()
        thread.join()


def tiny_kd_rlaif(
    tmp_path: Path, chat_models: dict[str, str], data: str, heldout: int, judges: list[dict]
) -> dict[str, Any]:
    """recipes/kd_rlaif.yaml on the tiny chat models: 2 steps, 8 new tokens, these judges,
    the data file `data` of recipes/data with `heldout` rows kept out."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    raw = yaml.safe_load((recipes / "kd_rlaif.yaml").read_text())
    raw["data"].update(path=str(recipes / "data" / data), seq_len=160, heldout=heldout)
    raw["judges"] = judges
    raw["teachers"][0]["model"] = chat_models["teacher"]
    raw["student"].update(model=chat_models["student"], layers=None)
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    raw["train"].update(steps=2, warmup_steps=0)
    raw["checkpoint"]["every"] = 0
    raw["rollout"]["max_new_tokens"] = 8
    return raw
