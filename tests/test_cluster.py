"""The cluster definitions of ``cluster/``: valid for the tools that read them, consistent with
the repository.

- ``cluster/autoscaler.yaml`` validates against the JSON schema shipped inside the installed
  ``ray`` package and passes the checks ``ray up`` runs before it calls the cloud
  (``prepare_config`` + ``validate_config``); broken copies fail, so the validation is real.
- The KubeRay manifests have the fields KubeRay requires (apiVersion ray.io/v1, kind,
  metadata.name, a head group, worker groups with GPU limits, the RayJob entrypoint and runtime
  env), string-valued rayStartParams, token authentication, and volumes that exist.
- Every ``python -m jobs.X --config FILE overrides...`` written in a cluster file, in docs/ or in
  the README names a real module and a real config file, and its overrides validate.
- Package pins (torch, torchvision, Ray and its image tags) agree with pyproject.toml.
- The runtime env is accepted by Ray and its excludes keep the upload to the code.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from frame_dist.config import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AUTOSCALER = CLUSTER / "autoscaler.yaml"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCS = REPO / "docs" / "cluster.md"


def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def autoscaler_config() -> dict:
    return yaml.safe_load(AUTOSCALER.read_text())


def pyproject_pins() -> dict[str, str]:
    """name -> version of every ``name==version`` (extras dropped) in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;,]+)", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def kuberay_docs() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document under cluster/kuberay/."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, d) for name, d in kuberay_docs() if d.get("kind") == kind]


def cluster_files() -> list[Path]:
    """The cluster definitions and every page that tells a user to run a job."""
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    return sorted(files) + sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


# --------------------------------------------------------------------------- autoscaler


def test_autoscaler_validates_against_rays_schema():
    cfg = autoscaler_config()
    jsonschema.validate(cfg, ray_schema())  # raises ValidationError naming the field

    # What `ray up` does before touching the cloud: fill in the provider defaults, merge the
    # setup commands, check node types against max_workers and head_node_type.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cfg)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _drop(path: tuple[str, ...]):
    def mutate(cfg: dict) -> None:
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(path: tuple[str, ...], value):
    def mutate(cfg: dict) -> None:
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


@pytest.mark.parametrize("mutate, error, message", [
    (_drop(("provider",)), jsonschema.ValidationError, "'provider' is a required property"),
    (_drop(("provider", "type")), jsonschema.ValidationError, "'type' is a required property"),
    (_drop(("available_node_types", "gpu.extract", "node_config")), jsonschema.ValidationError,
     "'node_config' is a required property"),
    (_set(("available_node_types", "gpu.train", "resources", "GPU"), "8"),
     jsonschema.ValidationError, "'8' is not of type 'integer'"),
    (_set(("available_node_types", "gpu.extract", "gpus"), 1), jsonschema.ValidationError,
     "Additional properties are not allowed"),
    (_set(("head_start_ray_commands",), "ray start --head"), jsonschema.ValidationError,
     "is not of type 'array'"),
    (_set(("head_node_type",), "ray.head.gpu"), ValueError,
     "`head_node_type` must be one of `available_node_types`"),
    (_set(("available_node_types", "gpu.extract", "min_workers"), 100), ValueError,
     "smaller than the sum of `min_workers`"),
], ids=["no-provider", "no-provider-type", "no-node-config", "gpu-as-string", "unknown-key",
        "commands-not-list", "unknown-head-type", "min-over-max"])
def test_autoscaler_broken_copies_fail_validation(mutate, error, message):
    from ray.autoscaler._private.util import validate_config

    broken = autoscaler_config()
    mutate(broken)
    with pytest.raises(error, match=re.escape(message)):
        validate_config(broken)  # the schema first, then Ray's cross-field checks


def test_autoscaler_cluster_shape():
    cfg = autoscaler_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {"gpu.extract", "gpu.train"} <= set(gpu_types)
    assert types["gpu.train"]["resources"]["GPU"] > types["gpu.extract"]["resources"]["GPU"]
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], name
            assert t["node_config"]["InstanceType"], name
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items()
                                     if n != cfg["head_node_type"])

    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start

    # token authentication on every node: the mode for every process, the token file synced
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"

    # the repository is synced, then installed from the synced copy
    repo_mounts = {remote for remote, local in cfg["file_mounts"].items() if local == "."}
    assert len(repo_mounts) == 1
    remote_repo = repo_mounts.pop()
    setup = cfg["setup_commands"]
    assert any(f"cd {remote_repo} && pip install" in c and c.endswith("-e .") for c in setup)
    for local in cfg["file_mounts"].values():
        if not local.startswith("~"):
            assert (REPO / local).exists(), local


# --------------------------------------------------------------------------- KubeRay


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay needs of a RayClusterSpec, and what frame-dist needs of it."""
    assert spec["rayVersion"] == pyproject_pins()["ray"], f"{where}: rayVersion"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth"
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"], f"{where}: head containers"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    gpu_groups = 0
    for group in [head, *groups]:
        label = f"{where}/{group.get('groupName', 'head')}"
        # KubeRay's CRD types rayStartParams as map[string]string: 1 instead of "1" is refused
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"{label}: rayStartParams.{key}={value!r} not a string"
        if group is not head:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            requests = container["resources"]["requests"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            # Kubernetes requires requests == limits for extended resources such as GPUs
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, label
            gpu_groups += gpus > 0 and group is not head
    assert gpu_groups >= 1, f"{where}: no worker group with nvidia.com/gpu limits"
    images = {c["image"] for _, pod in _pod_specs(spec) for c in pod["containers"]}
    assert len(images) == 1, f"{where}: one image for every Ray pod, got {images}"
    # every volumeMount names a volume of its pod; every claim is defined in cluster/kuberay
    claims = {d["metadata"]["name"] for _, d in of_kind("PersistentVolumeClaim")}
    for name, pod in _pod_specs(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}/{name}: volume {mount['name']}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}/{name}"


def test_kuberay_manifests_have_required_fields():
    for name, doc in kuberay_docs():
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc.get("metadata", {}).get("name"), f"{name}: metadata.name"
    clusters, jobs = of_kind("RayCluster"), of_kind("RayJob")
    assert [n for n, _ in clusters] == ["raycluster.yaml"]
    assert [n for n, _ in jobs] == ["rayjob.yaml"]
    for name, doc in clusters + jobs:
        assert doc["apiVersion"] == "ray.io/v1", name
    check_ray_cluster_spec(clusters[0][1]["spec"], "raycluster.yaml")
    check_ray_cluster_spec(jobs[0][1]["spec"]["rayClusterSpec"], "rayjob.yaml")


def test_rayjob_entrypoint_and_runtime_env():
    spec = of_kind("RayJob")[0][1]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    # Ray's own validation of the fields; working_dir exists only inside the image
    RuntimeEnv(**{k: v for k, v in runtime_env.items() if k != "working_dir"})
    # working_dir: the repository inside the image the Dockerfile builds
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    pins = pyproject_pins()
    packages = runtime_env["pip"]["packages"]
    assert sorted(packages) == sorted(f"{n}=={pins[n]}" for n in ("torch", "torchvision"))
    assert spec["shutdownAfterJobFinishes"] is True


def test_kuberay_image_is_the_dockerfiles():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for name, doc in of_kind("RayCluster") + of_kind("RayJob"):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for _, pod in _pod_specs(spec):
            for container in pod["containers"]:
                assert container["image"] == f"frame-dist:{version}", name


def _dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert len(workdirs) == 1
    return workdirs[0]


def test_dockerfile_copies_what_exists_and_every_package():
    text = (CLUSTER / "Dockerfile").read_text()
    sources = []
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        args = [a for a in line.split() if not a.startswith("--")]
        sources += args[:-1]
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, absent from the repository"
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    for pattern in include:  # "frame_dist*": the package must be in the image
        assert pattern.rstrip("*") in sources, f"package {pattern} is not copied"
    assert "configs" in sources  # the jobs' --config files
    assert "pip install --no-cache-dir -e ." in text


# --------------------------------------------------------------------------- commands


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every ``python -m jobs.X args...`` in ``text``: (module, args up to the end of command).

    Comment markers are dropped and backslash-continued lines joined, so commands written in
    YAML comments and markdown code blocks are read as a shell would.
    """
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    commands = []
    for m in re.finditer(r"python -m (jobs(?:\.\w+)+)([^\n]*)", joined):
        rest = re.split(r"\s(?:#|&&|\|\|?|;)\s|`", m.group(2))[0]
        commands.append((m.group(1), shlex.split(rest)))
    return commands


def all_job_commands() -> list[tuple[str, str, list[str]]]:
    found = [(p.name, mod, args) for p in cluster_files() for mod, args in
             job_commands(p.read_text())]
    for name, doc in of_kind("RayJob"):  # the folded entrypoint, as KubeRay reads it
        mod, *args = shlex.split(doc["spec"]["entrypoint"])[2:]
        found.append((f"{name} entrypoint", mod, args))
    return found


def test_job_commands_name_real_modules_configs_and_fields():
    commands = all_job_commands()
    files = {where for where, _, _ in commands}
    # the test reads what it should: commands in the autoscaler, KubeRay and the docs
    assert {"autoscaler.yaml", "raycluster.yaml", "rayjob.yaml entrypoint"} <= files
    assert {"cluster.md", "README.md"} <= files
    for where, module, args in commands:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{where}: no module {module}"
        assert Path(spec.origin).resolve().parent == REPO / "jobs", f"{where}: {module}"
        config = None
        if "--config" in args:
            config = args[args.index("--config") + 1]
            assert (REPO / config).is_file(), f"{where}: --config {config} does not exist"
        overrides = [a for a in args if re.match(r"^[a-z_]+\.[a-z_.]+=", a)]
        # unknown fields and invalid values are refused here, not on the cluster
        load_config(REPO / config if config else None, overrides)


def test_job_command_parser_reads_continuations_and_stops_at_comments():
    text = ("#   ray job submit --working-dir . -- \\\n"
            "#       python -m jobs.pipeline --config configs/demo.yaml \\\n"
            "#       graph.n_clips=8   # eight clips\n"
            "python -m jobs.ingest --config configs/demo.yaml && echo done\n")
    assert job_commands(text) == [
        ("jobs.pipeline", ["--config", "configs/demo.yaml", "graph.n_clips=8"]),
        ("jobs.ingest", ["--config", "configs/demo.yaml"]),
    ]


# --------------------------------------------------------------------------- pins


def test_pins_agree_with_pyproject():
    pins = pyproject_pins()
    seen = set()
    for path in cluster_files():
        text = path.read_text()
        for name, version in re.findall(r"\b(torch|torchvision)==([\w.+-]+)", text):
            assert version == pins[name], f"{path.name}: {name}=={version}, pyproject {pins[name]}"
            seen.add(name)
        for version in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text):
            assert version == pins["ray"], f"{path.name}: image ray {version}"
            seen.add("ray image")
        for version in re.findall(r"rayVersion:\s*\"?([\d.]+)", text):
            assert version == pins["ray"], f"{path.name}: rayVersion {version}"
    assert seen == {"torch", "torchvision", "ray image"}  # the check did look at something


# --------------------------------------------------------------------------- runtime env


def _package(path: Path, excludes: list[str], zip_path: Path) -> list[str]:
    from ray._private.runtime_env.packaging import create_package

    # include_gitignore=False: the excludes alone must do the job (a copy without .gitignore)
    create_package(str(path), zip_path, include_gitignore=False, excludes=excludes)
    return zipfile.ZipFile(zip_path).namelist()


def test_runtime_env_is_valid_and_uploads_only_code(tmp_path, monkeypatch):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV.read_text())
    monkeypatch.chdir(REPO)  # working_dir "." is the directory `ray job submit` runs in
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."

    # the excludes on a tree holding what they must keep out
    tree = tmp_path / "tree"
    for rel in ["jobs/pipeline.py", "configs/demo.yaml", ".git/objects/ab", ".venv/bin/python",
                "out/world/videos/v0.mp4", "data/v1.mp4", "frame_dist/__pycache__/x.pyc"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"\0" * 64)
    names = _package(tree, env["excludes"], tmp_path / "tree.zip")
    assert sorted(n for n in names if not n.endswith("/")) == [
        "configs/demo.yaml", "jobs/pipeline.py"]

    # the repository as `ray job submit --working-dir .` would upload it
    zip_path = tmp_path / "repo.zip"
    names = _package(REPO, env["excludes"], zip_path)
    assert {"jobs/pipeline.py", "configs/demo.yaml", "frame_dist/config.py",
            "feature_store/store.py"} <= set(names)
    assert not {n.split("/")[0] for n in names} & {".git", ".venv", "out"}
    assert zip_path.stat().st_size < 20 * 2**20, "the upload should hold code, not data"
