"""deploy/: every manifest parses, the RayJob runs a valid config, images pin the right versions."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from embr_rl.core.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
YAML_FILES = sorted(DEPLOY.glob("**/*.yaml"))
SHARED = "/mnt/embr"


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict[str, Any]:
    docs = _docs(path)
    assert len(docs) == 1, f"{path.name}: expected one document"
    return docs[0]


def _torch_version() -> str:
    m = re.search(
        r"TORCH_VERSION=\$\{TORCH_VERSION:-([0-9.]+)\}", (REPO / "scripts/install.sh").read_text()
    )
    assert m, "scripts/install.sh no longer sets a default TORCH_VERSION"
    return m.group(1)


def _pyproject_bounds() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def _arg(dockerfile: str, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile, re.M)
    assert m, f"ARG {name} missing"
    return m.group(1)


def _pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod specs of the head group and every worker group of a RayCluster spec."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _gpus(pod: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in pod["containers"]
    )


def _mounts_shared_pvc(pod: dict[str, Any]) -> bool:
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return any(
        m["mountPath"] == SHARED and m["name"] in claims
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
    )


def test_there_are_deploy_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.glob("**/*") if p.is_file()}
    assert {
        "Dockerfile",
        "Dockerfile.cpu",
        "build_cpu.sh",
        "cluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/pvc.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_rayjob_required_fields() -> None:
    job = _one(DEPLOY / "kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["runtimeEnvYAML"], str)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert cluster["workerGroupSpecs"], "no worker group"
    pods = _pods(cluster)
    assert all(_mounts_shared_pvc(p) for p in pods), f"every pod mounts the PVC at {SHARED}"
    assert sum(_gpus(p) for p in pods[1:]) > 0 and _gpus(pods[0]) == 0
    pvc = _one(DEPLOY / "kuberay/pvc.yaml")
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for p in pods
        for v in p.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert claims == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_runtime_env() -> None:
    spec = _one(DEPLOY / "kuberay/rayjob.yaml")["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert env["working_dir"] == "/app"  # where deploy/Dockerfile puts the project
    env_vars = env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values())  # Ray wants strings
    assert int(env_vars["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60  # time to checkpoint on SIGTERM
    assert env_vars["HF_HOME"].startswith(SHARED)


def test_rayjob_entrypoint_loads_and_validates() -> None:
    spec = _one(DEPLOY / "kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "embr_rl.run"]
    config, overrides = argv[3], argv[4:]
    assert all("=" in o for o in overrides)
    cfg = load_config(REPO / config, overrides)
    assert cfg.logging.run_dir.startswith(SHARED + "/")
    assert cfg.checkpoint.resume == "auto" and cfg.checkpoint.every > 0
    gpus_needed = (
        cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank
        + cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker
    )
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus_there = sum(g["replicas"] * _gpus(g["template"]["spec"]) for g in workers)
    assert gpus_there >= gpus_needed


def test_raycluster_has_head_and_gpu_workers() -> None:
    rc = _one(DEPLOY / "kuberay/raycluster.yaml")
    assert rc["kind"] == "RayCluster"
    pods = _pods(rc["spec"])
    assert _gpus(pods[0]) == 0
    assert any(_gpus(p) > 0 for p in pods[1:])
    assert all(_mounts_shared_pvc(p) for p in pods)


def test_cluster_launcher_file() -> None:
    c = _one(DEPLOY / "cluster.yaml")
    types = c["available_node_types"]
    head = c["head_node_type"]
    assert head in types and types[head]["resources"].get("GPU", 0) == 0
    workers = [t for n, t in types.items() if n != head]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert c["provider"]["type"] in ("aws", "gcp", "azure")
    setup = "\n".join(c["setup_commands"])
    assert "scripts/install.sh" in setup and SHARED in setup
    assert any("--head" in cmd for cmd in c["head_start_ray_commands"])


def test_dockerfiles_pin_the_project_versions() -> None:
    torch = _torch_version()
    bounds = _pyproject_bounds()
    pins: dict[str, dict[str, str]] = {}
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DEPLOY / name).read_text()
        pins[name] = {
            "torch": _arg(text, "TORCH_VERSION"),
            "ray": _arg(text, "RAY_VERSION"),
            "deepspeed": _arg(text, "DEEPSPEED_VERSION"),
        }
        assert pins[name]["torch"] == torch, f"{name}: torch differs from scripts/install.sh"
        for pkg in ("torch", "ray", "deepspeed"):
            assert Version(pins[name][pkg]) in bounds[pkg].specifier, (name, pkg)
    assert pins["Dockerfile"] == pins["Dockerfile.cpu"]
    cuda = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", cuda, re.M)
    assert "scripts/install.sh" in cuda and '"torch==${TORCH_VERSION}"' in cuda
    cpu = (DEPLOY / "Dockerfile.cpu").read_text()
    assert "deploy/build_cpu.sh" in cpu
    build = (DEPLOY / "build_cpu.sh").read_text()
    ray, ds = pins["Dockerfile"]["ray"], pins["Dockerfile"]["deepspeed"]
    assert f"RAY_VERSION:-{ray}" in build and f"DEEPSPEED_VERSION:-{ds}" in build
    assert "scripts/install.sh" in build


def test_manifests_use_the_pinned_ray_version() -> None:
    ray = _arg((DEPLOY / "Dockerfile").read_text(), "RAY_VERSION")
    assert _one(DEPLOY / "kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == ray
    assert _one(DEPLOY / "kuberay/raycluster.yaml")["spec"]["rayVersion"] == ray
    assert f"ray[default]=={ray}" in "\n".join(_one(DEPLOY / "cluster.yaml")["setup_commands"])


def test_build_script_is_executable() -> None:
    script = DEPLOY / "build_cpu.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash")


def test_no_package_index_host_is_named() -> None:
    """Installs go through pip's own configuration; a torch index is an opt-in variable."""
    import re

    hosts = re.compile(r"https?://[^\s\"']*(pypi|pytorch|pythonhosted|simple)[^\s\"']*")
    named = []
    for path in [
        *REPO.glob("scripts/*"),
        *REPO.glob("deploy/**/*"),
        REPO / "Makefile",
        REPO / ".ci" / "run",
        REPO / "pyproject.toml",
    ]:
        if path.is_file():
            named += [
                f"{path.relative_to(REPO)}: {m.group(0)}" for m in hosts.finditer(path.read_text())
            ]
    assert not named, named
