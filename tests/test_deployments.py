"""The federation as a Prefect user runs it: a real local Prefect server, a process work pool and
worker per cloud (plus the aggregator's), deployments from deployments/prefect.yaml, runs
triggered with `prefect deployment run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fedlib.config import load_config
from fedlib.round.checkpoint import CheckpointStore
from scripts.emulators import free_port
from tests.conftest import ROOT, cloud_clouds, tiny_config_dict, write_config

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOLS = ("federation-pool", "aws-pool", "gcp-pool", "azure-pool")


class PrefectServer:
    def __init__(self, home: Path, emulators) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "FEDLIB_ROOT": str(ROOT),
        }
        self.processes: list[subprocess.Popen] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Each cloud's worker gets only its own cloud's credentials; the aggregator reads all three.
        self.pool_env = {
            "aws-pool": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
            "gcp-pool": {},
            "azure-pool": {"AZURE_STORAGE_CONNECTION_STRING": emulators["azure"].connection_string},
            "federation-pool": {
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AZURE_STORAGE_CONNECTION_STRING": emulators["azure"].connection_string,
            },
        }

    def spawn(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(
            [PREFECT, *args],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def cli(self, *args: str, timeout: float = 180, unset: tuple[str, ...] = ()) -> str:
        env = {k: v for k, v in self.env.items() if k not in unset}
        done = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"Prefect server not healthy at {self.url}; see {self.logs}/server.log")

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers may ignore the first SIGTERM
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if process.poll() is not None:
                    break
                os.killpg(process.pid, sig)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    continue

    def client_call(self, fn):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def call():
            async with get_client() as client:
                return await fn(client)

        with temporary_settings({PREFECT_API_URL: self.url}):
            return asyncio.run(call())


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, emulators):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"), emulators)
    try:
        server.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(server.port))
        server.wait_healthy()
        for pool in POOLS:
            server.cli("work-pool", "create", pool, "--type", "process")
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        for pool in POOLS:
            server.spawn(pool, "worker", "start", "--pool", pool, "--type", "process", env=server.pool_env[pool])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def deployed_config(tmp_path_factory, corpus_dir, tiny_model_dir, emulators) -> Path:
    folder = tmp_path_factory.mktemp("deployed")
    raw = tiny_config_dict(folder, corpus_dir, tiny_model_dir)
    clouds = cloud_clouds(emulators, "deployed")
    clouds[2].pop("secret_block")  # the azure pool's environment carries its connection string here
    raw["clouds"] = clouds
    raw["training"]["rounds"] = 1
    raw["orchestration"] = {"client_timeout_s": 300}
    return write_config(folder, raw)


def _run_federation(server: PrefectServer, config_path: Path) -> str:
    """`prefect deployment run`, then wait for the flow run to finish; returns its id."""
    out = server.cli("deployment", "run", "federated-training/federation", "--param", f"config={config_path}")
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)

    async def state(client):
        return (await client.read_flow_run(run_id)).state

    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        current = server.client_call(state)
        if current is not None and current.is_final():
            assert current.is_completed(), f"federation run {run_id} ended {current.name}; logs in {server.logs}"
            return run_id
        time.sleep(0.25)
    raise TimeoutError(f"federation run {run_id} did not finish; logs in {server.logs}")


def _client_runs(server: PrefectServer, parent_run_id: str):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read(client):
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["client-training"])))

    return server.client_call(read)


def test_each_client_runs_on_its_own_pool_and_schedules_continue(prefect_server, deployed_config):
    first = _run_federation(prefect_server, deployed_config)
    runs = _client_runs(prefect_server, first)
    assert sorted((r.name, r.work_pool_name) for r in runs) == [  # each client's preflight too runs on its own pool
        ("aws-round-1", "aws-pool"),
        ("aws-round-1-preflight", "aws-pool"),
        ("azure-round-1", "azure-pool"),
        ("azure-round-1-preflight", "azure-pool"),
        ("gcp-round-1", "gcp-pool"),
        ("gcp-round-1-preflight", "gcp-pool"),
    ]
    assert all(r.state.is_completed() for r in runs)

    # A second run of the (scheduled) deployment continues the lineage from the first's adapter,
    # now with secure aggregation: each client's setup, training and reveal run on its own pool.
    raw = yaml.safe_load(deployed_config.read_text())
    raw["secure_aggregation"] = {"enabled": True}
    deployed_config.write_text(yaml.safe_dump(raw))
    _run_federation(prefect_server, deployed_config)
    config = load_config(deployed_config)
    store = CheckpointStore(config.checkpoint_url, config.federation.id, options=config.federation.checkpoint_options)
    assert store.latest_round() == 2
    first_final, second = store.manifest(1), store.manifest(2)
    assert second.parent_adapter_sha256 == first_final.adapter_sha256
    assert second.accepted == ["aws", "gcp", "azure"]
    assert second.secure_aggregation["revealed_by"] == ["aws", "azure", "gcp"]
    assert {store.manifest(r).mlflow_run_id for r in range(3)} == {first_final.mlflow_run_id}
    second_runs = [r for r in _client_runs(prefect_server, first) if "round-2" in r.name]
    assert sorted((r.name, r.work_pool_name) for r in second_runs) == sorted(
        (f"{cloud}-round-2{step}", f"{cloud}-pool")
        for cloud in ("aws", "gcp", "azure")
        for step in ("", "-preflight", "-secagg-setup", "-secagg-reveal")
    )
    assert all(r.state.is_completed() for r in second_runs)


def test_federation_deployment_carries_a_schedule_and_runs_one_at_a_time(prefect_server):
    async def read(client):
        return await client.read_deployment_by_name("federated-training/federation")

    deployment = prefect_server.client_call(read)
    assert deployment.work_pool_name == "federation-pool"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters["dispatch"] == "deployments"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
