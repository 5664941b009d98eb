"""The federation as a Prefect user runs it: a real local Prefect server, a process work pool and
worker per cloud (plus the aggregator's), deployments from deployments/prefect.process.yaml, runs
triggered with `prefect deployment run`."""

from __future__ import annotations

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
from tests.prefect_api import client_call

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
        return client_call(self.url, fn)


def _scheduled_federation_runs(server: PrefectServer, deployment_id) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    async def read(client):
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )

    return server.client_call(read)


def _read_federation_deployment(server: PrefectServer):
    async def read(client):
        return await client.read_deployment_by_name("federated-training/federation")

    return server.client_call(read)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, emulators, deployed_config):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"), emulators)
    try:
        server.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(server.port))
        server.wait_healthy()
        for pool in POOLS:
            server.cli("work-pool", "create", pool, "--type", "process", "--base-job-template", "deployments/work-pools/process.json")
        # Deployed as the file's header says: the schedule's config is $FEDLIB_CONFIG at deploy time.
        server.env["FEDLIB_CONFIG"] = str(deployed_config)
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.process.yaml")
        # The scheduler service fills in the schedule's next runs; keep them for the schedule's
        # test, then pause it, so that no 03:00 UTC run joins the runs these tests start.
        deployment = _read_federation_deployment(server)
        deadline = time.monotonic() + 60
        while not (scheduled := _scheduled_federation_runs(server, deployment.id)) and time.monotonic() < deadline:
            time.sleep(0.25)
        server.scheduled_runs = scheduled
        [schedule] = deployment.schedules

        async def pause(client):  # as `prefect deployment schedule pause` would, but keeping the parameters,
            await client.update_deployment_schedule(  # which Prefect 3.8.8's pause clears
                deployment.id, schedule.id, active=False, parameters=schedule.parameters
            )

        server.client_call(pause)
        for pool in POOLS:
            server.spawn(pool, "worker", "start", "--pool", pool, "--type", "process", env=server.pool_env[pool])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, emulators):
    """The aggregator's tracking as docs/deploying.md asks for it on the clouds: an MLflow tracking
    server whose artifacts (the registered versions among them) go to a bucket, moto's S3 here."""
    import s3fs

    folder = tmp_path_factory.mktemp("mlflow-server")
    bucket = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": emulators["s3"].url})
    bucket.mkdir("mlflow-artifacts")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": emulators["s3"].url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow-artifacts/fedlib",
    ]  # fmt: skip
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, f"mlflow server did not start; see {folder}/server.log"
                time.sleep(0.2)
        yield url, bucket
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


@pytest.fixture(scope="module")
def deployed_config(tmp_path_factory, corpus_dir, tiny_model_dir, emulators, mlflow_server) -> Path:
    folder = tmp_path_factory.mktemp("deployed")
    raw = tiny_config_dict(folder, corpus_dir, tiny_model_dir)
    raw["tracking"] = {"uri": mlflow_server[0]}
    clouds = cloud_clouds(emulators, "deployed")
    clouds[2].pop("secret_block")  # the azure pool's environment carries its connection string here
    raw["clouds"] = clouds
    raw["training"]["rounds"] = 1
    raw["orchestration"] = {"client_timeout_s": 300}
    return write_config(folder, raw)


def _drop_scheduled_runs(server: PrefectServer) -> None:
    """Runs the scheduler made before the fixture paused the schedule (one already under way may
    still add some): none may join a run these tests start, even at 03:00 UTC."""
    stray = _scheduled_federation_runs(server, _read_federation_deployment(server).id)

    async def delete(client):
        for run in stray:
            await client.delete_flow_run(run.id)

    server.client_call(delete)


def _run_federation(server: PrefectServer, config_path: Path) -> str:
    """`prefect deployment run`, then wait for the flow run to finish; returns its id."""
    _drop_scheduled_runs(server)
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


def _client_runs(server: PrefectServer):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read(client):
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["client-training"])))

    return server.client_call(read)


def test_each_client_runs_each_step_on_its_own_pool(prefect_server, deployed_config, mlflow_server):
    """`prefect deployment run` of the federation, with secure aggregation: each client's
    preflight, setup, training and reveal run as deployment runs on its own cloud's pool. (That a
    later deployment run continues the lineage is the separate-hosts drill's to show.)"""
    raw = yaml.safe_load(deployed_config.read_text())
    raw["secure_aggregation"] = {"enabled": True}
    deployed_config.write_text(yaml.safe_dump(raw))
    _run_federation(prefect_server, deployed_config)
    config = load_config(deployed_config)
    store = CheckpointStore(config.checkpoint_url, config.federation.id, options=config.federation.checkpoint_options)
    assert store.latest_round() == 1
    first = store.manifest(1)
    assert first.parent_adapter_sha256 == store.manifest(0).adapter_sha256
    assert first.accepted == ["aws", "gcp", "azure"]
    assert first.secure_aggregation["revealed_by"] == ["aws", "azure", "gcp"]
    runs = _client_runs(prefect_server)
    assert sorted((r.name, r.work_pool_name) for r in runs) == sorted(
        (f"{cloud}-round-1{step}", f"{cloud}-pool")
        for cloud in ("aws", "gcp", "azure")
        for step in ("", "-preflight", "-secagg-setup", "-secagg-reveal")
    )
    assert all(r.state.is_completed() for r in runs)
    # Nothing the aggregator must keep stayed on its disk: the registered version (the round's
    # transformers-flavour model) is in the tracking server's bucket.
    url, bucket = mlflow_server
    import mlflow

    versions = mlflow.MlflowClient(tracking_uri=url).search_model_versions(f"name='{config.registered_model_name}'")
    assert [int(v.tags["round"]) for v in versions] == [1]
    assert any(path.endswith("adapters/round-0001/MLmodel") for path in bucket.find("mlflow-artifacts/fedlib"))
    assert not (config.data_path / "mlartifacts").exists()


def test_the_shipped_schedule_runs_with_the_config(prefect_server, deployed_config):
    """deployments/prefect.process.yaml's schedule as written: active, and each run it schedules
    carries the `config` parameter the federation needs."""
    scheduled = prefect_server.scheduled_runs
    assert scheduled, "the shipped schedule made no scheduled run"
    assert all(run.parameters == {"dispatch": "deployments", "config": str(deployed_config)} for run in scheduled)
    assert all(run.expected_start_time.hour == 3 and run.expected_start_time.minute == 0 for run in scheduled)
    # Paused by the fixture (so no run fires during these tests), its parameters kept.
    deployment = _read_federation_deployment(prefect_server)
    assert [(s.active, s.parameters) for s in deployment.schedules] == [(False, {"config": str(deployed_config)})]


def test_federation_deployment_carries_a_schedule_and_runs_one_at_a_time(prefect_server):
    deployment = _read_federation_deployment(prefect_server)
    assert deployment.work_pool_name == "federation-pool"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.schedules[0].parameters == {"config": str(prefect_server.env["FEDLIB_CONFIG"])}
    assert deployment.parameters["dispatch"] == "deployments"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
