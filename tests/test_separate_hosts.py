"""The separate-hosts drill: a federation whose parties share nothing but the network, each party,
store and server a host of its own, through the faults clouds have.

Hosts (`tests.hosts`: a network namespace each, with its own address, behind one router whose
nftables fence says who may open what): the aggregator and the three clients (aws, gcp, azure),
each running its processes as its own OS user (`tests.parties`); each client's object store (S3,
GCS and Azure emulators), the aggregator's (S3: the signed checkpoints, and MLflow's artifacts);
Prefect's server and MLflow's tracking server, each on a PostgreSQL of its own host. A client
reaches its own store, the checkpoint store and the Prefect API, nothing else; the aggregator
reaches the stores, the Prefect API and MLflow; only MLflow's server reaches its database and its
artifacts. Each client's link is a token bucket of its own rate. The test's own process is the
operator's laptop: it deploys, starts the runs, and reads what every party could read.

The federation is started with `prefect deployment run`, its config passed as data, and a second
run is started while the first is going. Faults, each placed by an event (a Prefect state, or a
request a gate in front of a server holds), never by a sleep:
1. round 1: the Prefect server restarts while the clients train;
2. round 1's tracking: MLflow's PostgreSQL goes down under a request, and comes back;
3. round 2: aws's link goes down in the middle of its upload, and comes back after the deadline;
4. round 2's commit: the checkpoint store's host is unreachable for longer than one retry;
5. round 3's commit: the aggregator's flow process is killed between the adapter and the manifest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fedlib.config import parse_config
from fedlib.round.checkpoint import CheckpointStore
from fedlib.wire.keys import AGGREGATOR
from tests.conftest import PLAYS, ROOT
from tests.hosts import Host, Network, reachable
from tests.parties import (
    INNER_PORT,
    MLFLOW_PORT,
    PREFECT_PORT,
    STORE_PORT,
    VENV_BIN,
    GateControl,
    HostedMlflow,
    HostedPrefect,
    Party,
    require_root_and_users,
    start_gate,
    user,
    wait_for_port,
)
from tests.postgres import PORT as PG_PORT
from tests.postgres import PostgresCluster
from tests.test_deployments import POOLS

PARTIES = ("aggregator", "aws", "gcp", "azure")
CLIENT_PLAYS = {"aws": "tragedies", "gcp": "comedies", "azure": "histories"}  # each cloud's own text
STORES = {"aws": "s3-store", "gcp": "gcs-store", "azure": "blob-store"}
UPLINK_MBIT = {"aws": 20, "gcp": 30, "azure": 10}  # each cloud's own rate; downlinks at 4×
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ROUNDS = 3
DEADLINE_S = 100


def _connection_string(blob: Host) -> str:
    return (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={blob.url(STORE_PORT)}/devstoreaccount1;"
    )


def _network() -> tuple[Network, dict[str, Host]]:
    net = Network(prefix="fd").open()
    hosts = {"operator": net.add("operator", root=True)}
    for name in ("prefect-db", "prefect", "mlflow-db", "mlflow", "checkpoint-store", *STORES.values(), *PARTIES):
        hosts[name] = net.add(name)
    net.allow(hosts["operator"], *(h for name, h in hosts.items() if name != "operator"))
    net.allow(hosts["prefect"], hosts["prefect-db"])
    net.allow(hosts["mlflow"], hosts["mlflow-db"], hosts["checkpoint-store"])
    net.allow(hosts[AGGREGATOR], hosts["prefect"], hosts["mlflow"], hosts["checkpoint-store"], *(hosts[s] for s in STORES.values()))
    for client, store in STORES.items():
        net.allow(hosts[client], hosts["prefect"], hosts["checkpoint-store"], hosts[store])
        net.shape(hosts[client], UPLINK_MBIT[client], 4 * UPLINK_MBIT[client])
    return net, hosts


def _start_stores(hosts: dict[str, Host], logs: Path) -> list[subprocess.Popen]:
    """Each cloud's store on its host. The S3 ones (aws's, and the aggregator's checkpoint store)
    sit behind a gate, so a fault can land on one exact request."""
    moto = str(VENV_BIN / "moto_server")
    started = []
    for name in ("s3-store", "checkpoint-store"):
        host = hosts[name]
        started.append(host.spawn(moto, "-H", "127.0.0.1", "-p", str(INNER_PORT), log=logs / f"{name}.log"))
        started.append(start_gate(host, STORE_PORT, INNER_PORT, logs / f"{name}-gate.sock", logs / f"{name}-gate.log"))
    gcs = hosts["gcs-store"]
    emulator = str(VENV_BIN / "gcp-storage-emulator")
    started.append(gcs.spawn(emulator, "start", "--host", gcs.address, "--port", str(STORE_PORT), "--in-memory", log=logs / "gcs-store.log"))
    blob = hosts["blob-store"]
    azurite = str(ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob")
    location = Path(tempfile.mkdtemp(prefix="fedlib-azurite-"))
    flags = ("--location", str(location), "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose")
    started.append(blob.spawn(azurite, "--blobHost", blob.address, "--blobPort", str(STORE_PORT), *flags, log=logs / "blob-store.log"))
    for name in (*STORES.values(), "checkpoint-store"):
        wait_for_port(hosts[name].address, STORE_PORT, what=name)
    return started


def _corpus_text(corpus_dir: Path, genre: str) -> str:
    return "\n\n".join((corpus_dir / genre / f"{play}.md").read_text() for play in PLAYS[genre] if play != "macbeth")


@pytest.fixture(scope="module")
def drill(tmp_path_factory, corpus_dir, tiny_model_dir):
    require_root_and_users(PARTIES)
    logs = tmp_path_factory.mktemp("hosts-drill-logs")
    subprocess.run(["chmod", "755", str(logs)], check=True)
    shared = Path(tempfile.mkdtemp(prefix="fedlib-drill-"))  # public, read-only: the base model only
    shutil.copytree(tiny_model_dir, shared / "model")
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    net, hosts = _network()
    processes: list[subprocess.Popen] = []
    databases: list[PostgresCluster] = []
    parties: dict[str, Party] = {}
    mlflow: HostedMlflow | None = None
    prefect: HostedPrefect | None = None
    try:
        processes += _start_stores(hosts, logs)
        checkpoint_url = hosts["checkpoint-store"].url(STORE_PORT)
        import s3fs

        s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": checkpoint_url}).mkdir("drill-mlflow")
        databases.append(PostgresCluster(hosts["prefect-db"], logs / "prefect-db", ("prefect",)).start())
        databases.append(PostgresCluster(hosts["mlflow-db"], logs / "mlflow-db", ("mlflow",)).start())
        prefect = HostedPrefect(hosts["prefect"], databases[0], logs / "prefect-home", logs).start()
        mlflow = HostedMlflow(hosts["mlflow"], databases[1], "s3://drill-mlflow/artifacts", checkpoint_url, logs).start()

        s3 = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}  # the checkpoint store is S3: every party reads it
        azure = {"AZURE_STORAGE_CONNECTION_STRING": _connection_string(hosts["blob-store"])}
        credentials = {"aggregator": {**s3, **azure}, "aws": s3, "gcp": s3, "azure": {**s3, **azure}}
        parties = {name: Party(name, hosts[name], prefect.url, credentials[name], logs) for name in PARTIES}
        audit = parties[AGGREGATOR].drill / "opens.log"
        parties[AGGREGATOR].env.update(
            PYTHONPATH=f"{parties[AGGREGATOR].work}:{parties[AGGREGATOR].work / 'tests' / 'drill'}", FEDLIB_AUDIT_OPENS=str(audit)
        )
        for party in parties.values():
            party.prepare()
        publics = {name: party.key_init() for name, party in parties.items()}
        drill = {"hosts": hosts, "publics": publics, "model": shared / "model", "mlflow": mlflow}
        federation = drill_config(drill, ROUNDS)
        for party in parties.values():
            party.trust(federation)
        for name, genre in CLIENT_PLAYS.items():
            parties[name].write_private("data/train.md", _corpus_text(corpus_dir, genre))
        parties[AGGREGATOR].write_private("data/held-out.md", (corpus_dir / "tragedies" / "macbeth.md").read_text())
        for pool in POOLS:
            prefect.cli("work-pool", "create", pool, "--type", "process")
        # Deployed without FEDLIB_ROOT, the pull step's `{{ $FEDLIB_ROOT }}` is left for each
        # worker to fill in from its own environment: each party runs its own working copy.
        prefect.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.process.yaml", unset=("FEDLIB_ROOT",))
        for party in parties.values():
            party.start_worker()
        yield {
            **drill,
            "net": net,
            "prefect": prefect,
            "parties": parties,
            "databases": {"prefect": databases[0], "mlflow": databases[1]},
            "audit": audit,
            "logs": logs,
        }
    finally:
        for party in parties.values():
            party.stop()
        for server in (mlflow, prefect):
            if server is not None:
                server.stop()
        for process in processes:
            process.kill()
        for database in databases:
            database.stop()
        net.close()
        shutil.rmtree(shared, ignore_errors=True)


def drill_config(drill, rounds: int) -> dict:
    """The federation's config as data: nothing in it is a secret, a path on the aggregator's
    disk, or a file any worker must hold. `~` is each party's own home."""
    hosts = drill["hosts"]
    # A request that hangs (its host cut off) fails after 10 s; the task's retries are the policy.
    timeouts = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 2}}
    clouds = [
        {
            "name": "aws",
            "provider": "aws",
            "storage": "s3://drill-aws/fedlib",
            "storage_options": {"endpoint_url": hosts["s3-store"].url(STORE_PORT), "config_kwargs": timeouts},
            "work_pool": "aws-pool",
        },
        {
            "name": "gcp",
            "provider": "gcp",
            "storage": "gs://drill-gcp/fedlib",
            "storage_options": {"endpoint_url": hosts["gcs-store"].url(STORE_PORT), "token": "anon"},
            "work_pool": "gcp-pool",
        },
        {"name": "azure", "provider": "azure", "storage": "az://drill-azure/fedlib", "work_pool": "azure-pool"},
    ]
    for cloud in clouds:
        cloud["data"] = [f"file://{user(cloud['name']).pw_dir}/drill/data/train.md"]
    return {
        "federation": {
            "id": "drill",
            "data_dir": "~/drill/state",
            "seed": 3,
            "checkpoints": "s3://drill-checkpoints/fedlib",
            "checkpoint_options": {"endpoint_url": hosts["checkpoint-store"].url(STORE_PORT), "config_kwargs": timeouts},
        },
        "model": {"source": str(drill["model"])},
        "data": {"seq_len": 32},
        "evaluation": {"data": [f"file://{user(AGGREGATOR).pw_dir}/drill/data/held-out.md"], "max_blocks": 8, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"rounds": rounds, "local_steps": 4, "batch_size": 4, "learning_rate": 0.01},
        "aggregation": {"strategy": "fedavg", "min_clients": 2},
        "orchestration": {"dispatch": "deployments", "round_deadline_s": DEADLINE_S, "client_timeout_s": 300, "cancel_grace_s": 10},
        "tracking": {"uri": drill["mlflow"].url},
        "keyring": {
            "aggregator": drill["publics"][AGGREGATOR]["aggregator"],
            "clients": {name: drill["publics"][name]["clients"][name] for name in CLIENT_PLAYS},
            "key_source": "file:~/drill/key.pem",
        },
        "clouds": clouds,
    }


def test_a_client_host_reaches_only_its_own_store_the_checkpoints_and_the_api(drill):
    """Isolation by network as well as by credentials: a client's host cannot even open another
    client's store, MLflow, or a database; the aggregator cannot open a database either."""
    hosts = drill["hosts"]
    for client, own in STORES.items():
        host = hosts[client]
        assert reachable(host, hosts[own].address, STORE_PORT) == "open", client
        assert reachable(host, hosts["checkpoint-store"].address, STORE_PORT) == "open", client
        assert reachable(host, hosts["prefect"].address, PREFECT_PORT) == "open", client
        for other in (s for c, s in STORES.items() if c != client):
            assert reachable(host, hosts[other].address, STORE_PORT) == "unreachable", (client, other)
        assert reachable(host, hosts["mlflow"].address, MLFLOW_PORT) == "unreachable", client
        for database in ("prefect-db", "mlflow-db"):
            assert reachable(host, hosts[database].address, PG_PORT) == "unreachable", (client, database)
        for other in (c for c in STORES if c != client):
            assert reachable(host, hosts[other].address, 22) == "unreachable", (client, other)
        # Nothing of another party's listens on this host's loopback.
        for port in (PREFECT_PORT, MLFLOW_PORT, STORE_PORT, INNER_PORT, PG_PORT):
            assert reachable(host, "127.0.0.1", port) == "refused", (client, port)
    aggregator = hosts[AGGREGATOR]
    for store in (*STORES.values(), "checkpoint-store"):
        assert reachable(aggregator, hosts[store].address, STORE_PORT) == "open", store
    assert reachable(aggregator, hosts["mlflow"].address, MLFLOW_PORT) == "open"
    for database in ("prefect-db", "mlflow-db"):
        assert reachable(aggregator, hosts[database].address, PG_PORT) == "unreachable", database


def _start_federation(prefect: HostedPrefect, config: dict) -> str:
    out = prefect.cli("deployment", "run", "federated-training/federation", "--params", json.dumps({"config": config}))
    return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)


def test_a_federation_across_hosts_survives_the_faults_clouds_have(drill):
    prefect, parties, net, hosts = drill["prefect"], drill["parties"], drill["net"], drill["hosts"]
    config = drill_config(drill, ROUNDS)
    first = _start_federation(prefect, config)
    second = _start_federation(prefect, config)  # a schedule firing while the first is going: it waits

    final = _finished(prefect, parties, first, 900)
    assert final.is_completed(), f"{final.name}; logs in {drill['logs']}"
    final = _finished(prefect, parties, second, 400)
    assert final.is_completed(), f"{final.name}; logs in {drill['logs']}"

    settings = parse_config(config)
    store = CheckpointStore(
        settings.checkpoint_url, "drill", verifier=settings.keyring.publics.aggregator_signing, options=_operator(settings)
    )
    manifests = store.manifests()
    assert [m.round for m in manifests] == list(range(2 * ROUNDS + 1))
    del net, hosts


def _operator(settings) -> dict:
    """The checkpoint store's options, with the operator's credentials (the parties' come from their environment)."""
    return {**settings.federation.checkpoint_options, "key": "test", "secret": "test"}


def _finished(prefect: HostedPrefect, parties: dict, run_id, timeout: float):
    """The run's final state, waited for on the server's event stream."""
    from prefect.exceptions import FlowRunWaitTimeout
    from prefect.flow_runs import wait_for_flow_run

    try:
        return prefect.client_call(lambda client: wait_for_flow_run(run_id, timeout=int(timeout), client=client)).state
    except FlowRunWaitTimeout:
        pytest.fail(f"flow run {run_id} not finished within {timeout:.0f} s; {_workers_report(parties)}")


def _workers_report(parties: dict) -> str:
    lines = []
    for party in parties.values():
        if party.worker is not None and party.worker.poll() is not None and not party.killed:
            log = (party.logs / f"{party.pool}.log").read_text()[-3000:]
            lines.append(f"{party.name}'s worker exited ({party.worker.returncode}):\n{log}")
    return "\n".join(lines) or "workers alive"


_unused = GateControl
