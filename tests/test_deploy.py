"""Deployment files (cluster/, docker/) checked offline: they parse, agree with each other and with the package.

No Docker engine, Kubernetes cluster or cloud account is needed: the image is never built and the manifests are
never applied; what can be checked without them is checked here (README of cluster/, "What was checked").
"""

import copy
import fnmatch
import importlib.util
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from rlhf_diffusion.config import load_config
from rlhf_diffusion.launch import parse_args
from rlhf_diffusion.trainer import required_resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAYJOB = CLUSTER / "kuberay" / "rayjob-sdxl-dde.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
AWS = CLUSTER / "aws.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCAL_CLUSTER = CLUSTER / "local_cluster.sh"
IMAGE_WORKDIR = "/workspace"  # the image's WORKDIR: holds configs/ as the repository root does
RUNS_MOUNT = "/workspace/runs"
# raycluster.yaml is a standing cluster; its header says it has the same groups as the RayJob, sized for this one.
RAYCLUSTER_SIZED_FOR = "configs/sdxl_dde.yaml"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """`name==version` pins of pyproject's dependencies (lower-case names, extras dropped)."""
    pins = {}
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;,]+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def _one_doc(path: Path) -> dict:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _entrypoint_argv(manifest: dict) -> list[str]:
    return shlex.split(manifest["spec"]["entrypoint"])


def _launch_args(argv: list[str]):
    """launch's own argument parser applied to the entrypoint `python -m rlhf_diffusion.launch CONFIG ...`."""
    assert argv[:3] == ["python", "-m", "rlhf_diffusion.launch"], argv
    try:
        return parse_args(argv[3:])
    except SystemExit:
        pytest.fail(f"rlhf_diffusion.launch rejects the arguments {argv[3:]}")


def _entrypoint_config(argv: list[str]):
    """The run config the entrypoint would load."""
    args = _launch_args(argv)
    assert not Path(args.config).is_absolute(), "name the config relative to the image's WORKDIR"
    return load_config(ROOT / args.config, args.overrides)


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes quantities and what Ray makes of a pod / a cluster-launcher node
# ---------------------------------------------------------------------------------------------------------------


def _cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_ray_resources(group: dict) -> tuple[float, float]:
    """(CPU, GPU) one pod of a KubeRay group gives Ray: `rayStartParams` if set, else what KubeRay derives from
    the Ray container's limits (requests when there is no limit)."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    resources = container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" in params:
        cpu = float(params["num-cpus"])
    else:
        cpu = _cpu_quantity(limits.get("cpu", requests.get("cpu", 0)))
    if "num-gpus" in params:
        gpu = float(params["num-gpus"])
    else:
        gpu = float(limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 0)))
    return cpu, gpu


def _kuberay_nodes(manifest: dict) -> list[tuple[float, float]]:
    """(CPU, GPU) of every node the cluster is guaranteed to have: the head and minReplicas of each group."""
    spec = _cluster_spec(manifest)
    nodes = [_pod_ray_resources(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [_pod_ray_resources(group)] * int(group["minReplicas"])
    return nodes


def _aws_nodes(config: dict) -> list[tuple[float, float]]:
    nodes = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        count = 1 if name == config["head_node_type"] else node_type.get("min_workers", 0)
        assert "CPU" in resources and "GPU" in resources, f"{name}: state resources explicitly"
        nodes += [(float(resources["CPU"]), float(resources["GPU"]))] * count
    return nodes


def _actors(config) -> list[tuple[float, float]]:
    """(num_cpus, num_gpus) of every actor the trainer starts (actors.start_ray_actors)."""
    r = config.resources
    return (
        [(r.cpus_per_actor, r.sampler_gpus)] * r.num_samplers
        + [(r.cpus_per_actor, r.reward_server_gpus)] * r.num_reward_servers
        + [(r.cpus_per_actor, r.learner_gpus)]
    )


def _packs(actors: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> bool:
    """First-fit decreasing: True when every actor fits on some node (a sufficient condition for Ray to place
    them all). A fractional-GPU actor needs that fraction on one node."""
    free = [list(node) for node in nodes]
    for cpu, gpu in sorted(actors, key=lambda a: (a[1], a[0]), reverse=True):
        for node in free:
            if node[0] + 1e-9 >= cpu and node[1] + 1e-9 >= gpu:
                node[0] -= cpu
                node[1] -= gpu
                break
        else:
            return False
    return True


def _assert_covers(nodes: list[tuple[float, float]], config, where: str) -> None:
    need = required_resources(config)
    have = {"CPU": sum(n[0] for n in nodes), "GPU": sum(n[1] for n in nodes)}
    for kind in ("CPU", "GPU"):
        assert have[kind] + 1e-9 >= need[kind], f"{where}: {have[kind]:g} {kind} < {need[kind]:g} the config needs"
    assert _packs(_actors(config), nodes), f"{where}: the actors {_actors(config)} do not fit on the nodes {nodes}"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile parsing
# ---------------------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and `\\` continuations joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags such as --chown dropped."""
    out = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
    return out


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parent directories decides;
    `!` re-includes; `**/` also matches zero directories."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_every_yaml_under_cluster_parses_into_mappings():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert {RAYJOB, RAYCLUSTER, AWS} <= set(files)
    for path in files:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert docs and all(isinstance(doc, dict) for doc in docs), path


@pytest.mark.parametrize("path, kind", [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")])
def test_kuberay_manifests_have_the_kuberay_v1_shape(path, kind):
    manifest = _one_doc(path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    spec = _cluster_spec(manifest)
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        # The CRD types rayStartParams as map[string]string: an unquoted `num-cpus: 0` is rejected on apply.
        assert all(isinstance(v, str) for v in (group.get("rayStartParams") or {}).values()), group
        containers = group["template"]["spec"]["containers"]
        assert containers and containers[0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    # No actor on the head: it runs the driver; CPUs there would let Ray put a 4-CPU actor beside it.
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_the_launch_module_on_a_shipped_config_and_cleans_up():
    manifest = _one_doc(RAYJOB)
    assert not any(token in manifest["spec"]["entrypoint"] for token in ("&&", ";", "|", "`", "$(")), (
        "KubeRay pastes the entrypoint into the submitter's shell command line: keep it one plain command"
    )
    argv = _entrypoint_argv(manifest)
    assert argv[:3] == ["python", "-m", "rlhf_diffusion.launch"]
    assert importlib.util.find_spec("rlhf_diffusion.launch") is not None
    config_path = _launch_args(argv).config
    assert (ROOT / config_path).is_file() and config_path.startswith("configs/"), config_path
    config = _entrypoint_config(argv)
    assert config.output_dir == RUNS_MOUNT
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True


def test_every_launch_command_in_cluster_files_names_an_existing_config():
    named = set()
    for path in [*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.md"), LOCAL_CLUSTER, DOCKERFILE]:
        for match in re.finditer(r"rlhf_diffusion\.launch\s+(\S+\.yaml)", path.read_text()):
            named.add(match.group(1))
    assert "configs/sdxl_dde.yaml" in named and "configs/tiny.yaml" in named
    for config in named:
        assert (ROOT / config).is_file(), config


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER])
def test_output_dir_is_a_persistent_volume_mounted_on_every_pod(path):
    spec = _cluster_spec(_one_doc(path))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m for m in pod["containers"][0].get("volumeMounts", [])}
        assert RUNS_MOUNT in mounts, f"{group.get('groupName', 'head')}: {RUNS_MOUNT} not mounted"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[RUNS_MOUNT]["name"])
        assert volume.get("persistentVolumeClaim", {}).get("claimName"), "runs/ must outlive the cluster"
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
        assert env.get("HF_HOME") in mounts, "HF_HOME should be a mounted (shared) cache"


def test_rayjob_groups_cover_the_resources_of_its_config():
    manifest = _one_doc(RAYJOB)
    config = _entrypoint_config(_entrypoint_argv(manifest))
    assert required_resources(config) == {"CPU": 24.0, "GPU": 6.0}  # sdxl_dde.yaml: 6 actors x (4 CPU, 1 GPU)
    spec = _cluster_spec(manifest)
    assert spec.get("enableInTreeAutoscaling") is not True, "the driver checks resources once, at start"
    _assert_covers(_kuberay_nodes(manifest), config, RAYJOB.name)


def test_raycluster_groups_cover_the_config_it_is_sized_for():
    config = load_config(ROOT / RAYCLUSTER_SIZED_FOR)
    _assert_covers(_kuberay_nodes(_one_doc(RAYCLUSTER)), config, RAYCLUSTER.name)
    job, cluster = _cluster_spec(_one_doc(RAYJOB)), _cluster_spec(_one_doc(RAYCLUSTER))
    assert job["workerGroupSpecs"] == cluster["workerGroupSpecs"], "the header says: the same groups"


def test_coverage_check_catches_a_group_too_small():
    """The check above would fail for one GPU pod short, and for 2-CPU pods that cannot hold a 4-CPU actor."""
    manifest = _one_doc(RAYJOB)
    config = _entrypoint_config(_entrypoint_argv(manifest))
    short = copy.deepcopy(manifest)
    short["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 5
    with pytest.raises(AssertionError, match="GPU"):
        _assert_covers(_kuberay_nodes(short), config, "short")
    thin = [(2.0, 1.0)] * 12 + [(0.0, 0.0)]  # 24 CPUs, 12 GPUs in all, but no pod holds a 4-CPU actor
    with pytest.raises(AssertionError, match="do not fit"):
        _assert_covers(thin, config, "thin")


def test_aws_config_passes_rays_own_validation_and_covers_sdxl_dde():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS.read_text())
    validate_config(raw)
    prepared = prepare_config(copy.deepcopy(raw))  # merges Ray's AWS defaults, as `ray up` does before launching
    validate_config(prepared)
    assert prepared["setup_commands"] == [], "Ray's default setup_commands would pip-install another Ray"
    assert prepared["docker"]["image"] and prepared["docker"]["container_name"]
    _assert_covers(_aws_nodes(prepared), load_config(ROOT / "configs/sdxl_dde.yaml"), AWS.name)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "no actor on the head"


def test_one_image_everywhere_built_by_the_dockerfile_with_pyprojects_version_as_tag():
    images = set()
    for path in (RAYJOB, RAYCLUSTER):
        spec = _cluster_spec(_one_doc(path))
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    docker = yaml.safe_load(AWS.read_text())["docker"]
    images |= {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert len(images) == 1, f"the manifests and aws.yaml name different images: {sorted(images)}"
    image = images.pop()
    name, _, tag = image.rpartition(":")
    assert name.rsplit("/", 1)[-1] == "rlhf-diffusion"
    assert tag == PYPROJECT["project"]["version"], "tag convention: rlhf-diffusion:<pyproject version>"
    dockerfile = DOCKERFILE.read_text()
    assert f"docker build -f docker/Dockerfile -t {image} ." in dockerfile, "the Dockerfile documents its build"
    labels = " ".join(rest for keyword, rest in _dockerfile_instructions() if keyword == "LABEL")
    assert f'org.opencontainers.image.version="{tag}"' in labels


def test_base_image_is_pinned_and_carries_the_manifests_ray_and_pyprojects_python():
    froms = [rest.split()[0] for keyword, rest in _dockerfile_instructions() if keyword == "FROM"]
    assert froms
    for base in froms:
        name, _, tag = base.rpartition(":")
        assert "@sha256:" in base or (name and "/" not in tag and tag not in ("", "latest")), base
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[-1])
    assert match, f"expected Ray's GPU image, got {froms[-1]}"
    ray_version, python = match.group(1), f"{match.group(2)}.{match.group(3)}"
    for path in (RAYJOB, RAYCLUSTER):
        assert _cluster_spec(_one_doc(path))["rayVersion"] == ray_version, path
    assert PYPROJECT["project"]["requires-python"] == f">={python},<{match.group(2)}.{int(match.group(3)) + 1}"
    from packaging.requirements import Requirement

    ray_pin = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray")
    assert ray_pin.specifier.contains(ray_version), (
        f"pyproject pins {ray_pin}, the base image carries Ray {ray_version}"
    )


def test_dockerfile_installs_the_package_from_pyproject_as_a_non_root_user():
    instructions = _dockerfile_instructions()
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    # pyproject.toml goes into a directory that is then pip-installed (not editable): pyproject is the one list
    # of dependencies.
    pyproject_dirs = {dest.rstrip("/") for sources, dest in _copies() if "pyproject.toml" in sources}
    assert pyproject_dirs
    installs = [re.findall(r"pip install (?!-)(\S+)", run) for run in runs]
    targets = {t.rstrip("/") for found in installs for t in found}
    assert targets & pyproject_dirs or "." in targets, f"no `pip install <dir with pyproject.toml>` in {runs}"
    assert not any("pip install -e" in run or "--editable" in run for run in runs)
    # Any explicit pin of a package pyproject pins must be pyproject's (torch / torchvision for a CUDA index).
    pins = _pins()
    assert {"torch", "torchvision"} <= set(pins)
    for run in runs:
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([^\s'\"]+)", run):
            if name.lower() in pins:
                assert version == pins[name.lower()], f"{name}=={version} in the Dockerfile, pyproject: {pins[name]}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == IMAGE_WORKDIR
    # Configs at WORKDIR/configs, where the manifests' relative `configs/...` finds them.
    assert (["configs"], f"{IMAGE_WORKDIR}/configs") in _copies()
    # KubeRay replaces the container command with `ray start`; the cluster launcher runs `<image> bash`.
    assert not any(keyword == "ENTRYPOINT" for keyword, _ in instructions)


def test_dockerignore_keeps_the_venv_runs_and_caches_out_but_lets_every_copy_source_in():
    for sources, _ in _copies():
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _dockerignore_excludes(source), f"COPY {source} but .dockerignore excludes it"
    for inside in ("rlhf_diffusion/launch.py", "configs/tiny.yaml"):
        assert not _dockerignore_excludes(inside)
    for outside in (
        ".venv/bin/python",
        "runs/tiny/metrics.jsonl",
        "mlruns/0/meta.yaml",
        ".pytest_cache/v/x",
        "rlhf_diffusion/__pycache__/launch.cpython-311.pyc",
        "tests/test_deploy.py",
        ".git/HEAD",
    ):
        assert _dockerignore_excludes(outside), outside


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_local_cluster_script_parses_helps_and_never_stops_ray_globally():
    assert subprocess.run(["bash", "-n", str(LOCAL_CLUSTER)], capture_output=True).returncode == 0
    help_run = subprocess.run(["bash", str(LOCAL_CLUSTER), "--help"], capture_output=True, text=True, timeout=30)
    assert help_run.returncode == 0, help_run.stderr
    assert "start" in help_run.stdout and "stop" in help_run.stdout
    bad = subprocess.run(["bash", str(LOCAL_CLUSTER), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    text = LOCAL_CLUSTER.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "ray job submit --address http://127.0.0.1:" in text and "configs/tiny.yaml" in text
    code = [line.split("#", 1)[0] for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"(\bray|RAY_BIN\"?)\s+stop\b", line)], "no global `ray stop`"
