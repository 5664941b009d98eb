"""Every entrypoint in deployments/prefect.yaml imports and names a Prefect flow, with a pull step
and a work pool per deployment and no credentials in the file."""

from __future__ import annotations

import importlib.util
import re

import yaml
from prefect import Flow

from tests.conftest import ROOT

SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def test_every_entrypoint_is_an_importable_flow():
    assert SPEC["deployments"]
    for deployment in SPEC["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        spec = importlib.util.spec_from_file_location(f"entry_{deployment['name']}", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, name), Flow), deployment["name"]


def test_each_cloud_has_its_own_pool_and_no_secret_is_written():
    pools = {d["name"]: d["work_pool"]["name"] for d in SPEC["deployments"]}
    assert pools == {"federation": "federation-pool", "aws": "aws-pool", "gcp": "gcp-pool", "azure": "azure-pool"}
    assert "set_working_directory" in str(SPEC["pull"])
    text = (ROOT / "deployments" / "prefect.yaml").read_text()
    assert not re.search(r"(?i)(secret_access_key|account_key|password)\s*:", text)


def test_real_cloud_base_job_templates_are_complete():
    import json

    for name in ("ecs", "cloud-run-v2", "azure-container-instance", "kubernetes"):
        template = json.loads((ROOT / "deployments" / "work-pools" / f"{name}.json").read_text())
        assert {"job_configuration", "variables"} <= template.keys(), name
        assert {"image", "env"} <= template["variables"]["properties"].keys(), name
