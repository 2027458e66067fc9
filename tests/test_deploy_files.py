"""The deployment files cannot rot: every YAML in deploy/ and prefect.yaml parses and has the structure its tool
needs (KubeRay kinds, the token Secret in every Ray container, GPU resources; Ray's cluster-launcher schema; Prefect's
prefect.yaml model), every ``segpipe`` command line in them parses with the real CLI parser, every ``ray start`` with
Ray's own, and prefect.yaml's parameters are the flow's parameters with RunOptions / DatasetOptions field names.
``tests/flows/test_prefect_deploy.py`` deploys prefect.yaml on a real Prefect server and runs it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from segpipe.cli import build_parser
from segpipe.core.options import from_values

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PREFECT_YAML = ROOT / "prefect.yaml"
FILES = [*sorted(DEPLOY.rglob("*.yaml")), PREFECT_YAML]
IMAGE = "registry.example.org/segpipe:0.1.0"
SECRET = "segpipe-ray-token"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube(kind: str) -> list[dict[str, Any]]:
    """Every manifest of ``kind`` under deploy/."""
    return [doc for path in DEPLOY.rglob("*.yaml") for doc in documents(path) if doc.get("kind") == kind]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster specs: each RayCluster's, and each RayJob's rayClusterSpec."""
    specs = [(f"RayCluster {c['metadata']['name']}", c["spec"]) for c in kube("RayCluster")]
    specs += [(f"RayJob {j['metadata']['name']}", j["spec"]["rayClusterSpec"]) for j in kube("RayJob")]
    return specs


def groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def strict_parser() -> argparse.ArgumentParser:
    """The real ``segpipe`` parser, refusing abbreviated options: a flag renamed to a longer name must fail here,
    not parse as an abbreviation of it."""

    def strict(parser: argparse.ArgumentParser) -> None:
        parser.allow_abbrev = False
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    strict(child)

    parser = build_parser()
    strict(parser)
    return parser


COMMAND = re.compile(r"(?:^|(?<=[\s'\"]))(segpipe (?:run|dataset|serve) [^'\"\n#]*)")


def segpipe_commands(path: Path) -> list[str]:
    """Every ``segpipe run|dataset|serve`` command line of a YAML file: in its values (a RayJob's entrypoint, folded)
    and in its comments (backslash continuations joined)."""
    found = [m.group(1) for text in (s for d in documents(path) for s in strings(d)) for m in COMMAND.finditer(text)]
    comments = [line.strip()[1:].strip() for line in path.read_text().splitlines() if line.strip().startswith("#")]
    joined = re.sub(r"\\\s*\n\s*", " ", "\n".join(comments))
    found += [m.group(1) for m in COMMAND.finditer(joined)]
    return [" ".join(command.split()) for command in found]


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_every_deployment_file_parses(path: Path) -> None:
    assert documents(path), f"{path} is empty"


def test_the_deploy_folder_has_kuberay_and_ray_up_files() -> None:
    assert [c["apiVersion"] for c in kube("RayCluster")] == ["ray.io/v1"]
    assert [j["apiVersion"] for j in kube("RayJob")] == ["ray.io/v1"]
    assert (DEPLOY / "ray-up" / "aws.yaml").is_file()
    page = (ROOT / "docs" / "deploy.md").read_text()
    for path in FILES:
        assert path.relative_to(ROOT).as_posix() in page, f"docs/deploy.md does not speak of {path.name}"


@pytest.mark.parametrize(("name", "spec"), ray_cluster_specs(), ids=[n for n, _ in ray_cluster_specs()])
def test_ray_clusters_authenticate_with_the_token_secret_and_have_gpu_workers(name: str, spec: dict[str, Any]) -> None:
    from ray.scripts.scripts import start

    major, minor, *_ = (int(part) for part in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), f"{name}: token authentication needs Ray 2.52 or newer"
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}, name
    gpu_groups = []
    for group_name, group in groups(spec):
        params = group.get("rayStartParams", {})
        start.make_context("ray start", [f"--{key}={value}" for key, value in params.items()])  # Ray's own options
        containers = group["template"]["spec"]["containers"]
        ray_container = containers[0]
        assert ray_container["image"] == IMAGE, f"{name} {group_name}: the Dockerfile's image"
        env = env_of(ray_container)
        assert env["RAY_AUTH_MODE"] == "token", f"{name} {group_name}"
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": SECRET, "key": "auth_token"}}, f"{name} {group_name}"
        resources = ray_container["resources"]
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if group_name == "head":
            assert gpus is None and params.get("num-cpus") == "0", f"{name}: a CPU head that schedules nothing"
            ports = {p["name"]: p["containerPort"] for p in ray_container["ports"]}
            assert ports["gcs-server"] == 6379 and ports["client"] == 10001
        elif gpus:
            assert resources["requests"]["nvidia.com/gpu"] == gpus, f"{name} {group_name}: GPUs requested as limited"
            assert params.get("num-gpus") == str(gpus), f"{name} {group_name}: one segmenter per GPU"
            gpu_groups.append(group_name)
    assert gpu_groups, f"{name} has no GPU worker group"


def test_segpipe_command_lines_in_the_deployment_files_parse_with_the_real_cli() -> None:
    commands = {path.relative_to(ROOT).as_posix(): segpipe_commands(path) for path in FILES}
    assert commands["deploy/kuberay/rayjob.yaml"] and commands["deploy/ray-up/aws.yaml"]
    parser = strict_parser()
    for page, lines in commands.items():
        for line in lines:
            try:
                args = parser.parse_args(shlex.split(line)[1:])
            except SystemExit as exc:
                pytest.fail(f"{page}: `{line}` does not parse (exit {exc.code})")
            if page.startswith("deploy/"):  # drivers on a Ray node of the cluster: they find it with auto
                assert getattr(args, "ray_address", None) == "auto", f"{page}: `{line}` would start its own Ray"
    (job,) = kube("RayJob")
    entrypoint = " ".join(job["spec"]["entrypoint"].split())
    assert entrypoint.startswith("segpipe dataset ") and entrypoint in commands["deploy/kuberay/rayjob.yaml"]


def test_the_prefect_worker_runs_prefect_yaml_s_pool_with_the_token() -> None:
    (deployment,) = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    (worker,) = kube("Deployment")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    command = container["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == deployment["work_pool"]["name"]
    env = env_of(container)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": SECRET, "key": "auth_token"}}
    (pull,) = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert container["workingDir"] == pull["prefect.deployments.steps.set_working_directory"]["directory"]
    (cluster,) = kube("RayCluster")
    assert deployment["parameters"]["options"]["ray_address"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"


def test_prefect_yaml_is_a_deployment_of_the_dataset_flow_with_its_parameters() -> None:
    from segpipe.flows import dataset as dataset_flow
    from segpipe.flows.deploy import deployment_parameters
    from segpipe.pipeline.settings import DatasetOptions, RunOptions, ScheduleOptions

    config = yaml.safe_load(PREFECT_YAML.read_text())
    (deployment,) = config["deployments"]
    path, function = deployment["entrypoint"].split(":")
    assert (ROOT / path).resolve() == Path(dataset_flow.__file__).resolve(), "an entrypoint in path/file.py:flow form"
    flow = getattr(dataset_flow, function)
    assert flow.name == "segment_dataset"

    signature = inspect.signature(flow.fn)
    parameters = deployment["parameters"]
    assert set(parameters) <= set(signature.parameters), "parameters named as the flow takes them"
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(parameters), f"the flow's required parameters: {sorted(required)}"
    assert set(parameters) == set(deployment_parameters("in", "out", None, None)), "as `segpipe serve` registers it"
    for name, cls in (("options", RunOptions), ("dataset", DatasetOptions)):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(parameters.get(name) or {}) - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not {cls.__name__} fields"
        from_values(cls, parameters.get(name))  # the values the flow will build its options from are valid

    (schedule,) = deployment["schedules"]
    ScheduleOptions(cron=schedule["cron"], timezone=schedule["timezone"])  # five cron fields, a real time zone
    assert schedule.get("active", True) is True

    (pull,) = config["pull"]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": workdir[-1]}}, "the image's folder"
    assert deployment["work_pool"]["name"]
    page = (ROOT / "docs" / "deploy.md").read_text()
    assert f"prefect work-pool create {deployment['work_pool']['name']} --type process" in page


def test_prefect_yaml_fits_prefect_s_own_model() -> None:
    try:
        from prefect.cli.deploy._models import PrefectYamlModel
    except ImportError:  # pragma: no cover - a private module of prefect 3.8; the real deployment test still runs
        pytest.skip("prefect.cli.deploy._models moved")
    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    (deployment,) = model.deployments
    assert deployment.work_pool is not None and deployment.schedules


def test_the_ray_up_config_fits_ray_s_schema_installs_as_the_readme_and_starts_with_token_auth() -> None:
    from ray.scripts.scripts import start, stop

    config = yaml.safe_load((DEPLOY / "ray-up" / "aws.yaml").read_text())
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # pragma: no cover - private to Ray; the other checks still run
        pass
    else:
        validate_config(prepare_config(dict(config)))  # Ray's cluster-config JSON schema, with its defaults filled
    assert "~/.ray/auth_token" in config["file_mounts"].values(), "the token generated locally goes to every node"

    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install") : readme.index("## Run")]
    pip_lines = [
        part.strip()
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for command in config[key]
        for part in command.split("#")[0].split("&&")
        if ".venv/bin/pip install" in part and "boto3" not in part  # boto3: the AWS autoscaler's, on the head
    ]
    assert len(pip_lines) >= 3
    for line in pip_lines:
        assert line in install, f"`{line}` is not how the README installs segpipe"

    commands = {"start": start, "stop": stop}
    started = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            for part in command.split(";"):
                words = shlex.split(part)
                ray = next((i for i, word in enumerate(words) if word == "ray" or word.endswith("/bin/ray")), None)
                if ray is None:
                    continue  # ulimit
                subcommand, argv = words[ray + 1], words[ray + 2 :]
                assert words[ray].startswith("~/segpipe/.venv/bin/"), f"`{part.strip()}`: not the venv's Ray"
                commands[subcommand].make_context(f"ray {subcommand}", argv)  # Ray's own options
                if subcommand == "start":
                    assert "RAY_AUTH_MODE=token" in words[:ray], f"`{part.strip()}`: Ray starts unauthenticated"
                    started.append(key)
    assert started == ["head_start_ray_commands", "worker_start_ray_commands"]
