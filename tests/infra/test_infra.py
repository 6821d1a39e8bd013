"""Deployment files stay valid and in step with the package: cluster YAML, image, KubeRay, runtime env."""

import copy
import re
import shlex
import tomllib

import pytest
import yaml

from jobs.cli import JOBS
from pipeline import __version__

from ..conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"dvt-pipeline:{PYPROJECT['project']['version']}"


def load(path: str):
    return yaml.safe_load((ROOT / path).read_text())


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray_cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_single"]["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_keeps_work_off_the_head_and_uses_the_image():
    config = load("ray_cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert config["docker"]["image"] == IMAGE
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert {"gpu_single", "gpu_multi"} <= set(workers)
    for node in config["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Name"] == "dvt-ray-s3"
    assert workers["gpu_single"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def dockerfile_lines() -> list[str]:
    text = (ROOT / "infra" / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_installs_from_pyproject_and_pins_nothing_itself():
    lines = dockerfile_lines()
    base = next(line for line in lines if line.startswith("FROM"))
    python = re.search(r"python:(\d+\.\d+)", base).group(1)
    assert python == "3.11"  # the version CI and the pins were proven on
    lo = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("."))) >= tuple(map(int, lo.split(".")))
    installs = [line for line in lines if re.search(r"\bpip install\b", line)]
    assert installs, "the image installs nothing"
    for line in installs:
        for part in re.split(r"&&", line):
            if "pip install" not in part:
                continue
            args = [a for a in shlex.split(part.split("pip install", 1)[1]) if not a.startswith("-")]
            assert args == ["."], f"the image must install the package from pyproject.toml only, got: {part}"
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY")]
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    copied = {s for sources in copies for s in sources}
    assert {"pyproject.toml", "pipeline", "jobs"} <= copied


def test_kuberay_manifests_parse_and_run_real_entry_points():
    cluster = load("infra/kuberay/raycluster.yaml")
    job = load("infra/kuberay/rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    ray_version = PYPROJECT["project"]["dependencies"]
    pinned = next(d for d in ray_version if d.startswith("ray[")).split("==")[1]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == pinned
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            assert pod["spec"]["serviceAccountName"] == "dvt-s3"
            assert all(c["image"] == IMAGE for c in pod["spec"]["containers"])
        gpus = [g for g in spec["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpus, "no GPU worker group"
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["python", "-m"] and entry[2] in JOBS.values()
    assert (ROOT / (entry[2].replace(".", "/") + ".py")).is_file()
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] >= 1
    # the entry point's flags are ones the job accepts
    import importlib
    import argparse

    parser = argparse.ArgumentParser()
    importlib.import_module(entry[2]).add_arguments(parser)
    parser.parse_args(entry[3:])


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = load("infra/runtime_env.yaml")
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]
    RuntimeEnv(**env)


def test_image_tag_follows_the_package_version():
    assert IMAGE.endswith(__version__)
