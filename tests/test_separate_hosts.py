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

import copy
import functools
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedlib.config import parse_config
from fedlib.round.checkpoint import CheckpointStore
from fedlib.wire.keys import AGGREGATOR
from scripts.hosts import Host, Network, reachable, wait_for_port
from tests.conftest import PLAYS, ROOT
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
)
from tests.postgres import PORT as PG_PORT
from tests.postgres import PostgresCluster
from tests.test_deployments import POOLS

LOCKED_PROCESS_POOL = ROOT / "deployments" / "work-pools" / "process.json"  # what a client cannot override

PARTIES = ("aggregator", "aws", "gcp", "azure")
CLIENT_PLAYS = {"aws": "tragedies", "gcp": "comedies", "azure": "histories"}  # each cloud's own text
STORES = {"aws": "s3-store", "gcp": "gcs-store", "azure": "blob-store"}
UPLINK_MBIT = {"aws": 20, "gcp": 30, "azure": 10}  # each cloud's own rate; downlinks at 4×
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ROUNDS = 3
# From dispatch: the worker's poll, a new process importing torch, training, upload; in round 1
# also the Prefect restart. Round 1 took 34-37 s with compiled bytecode on 2 cores (the deadline
# also bounds how long round 2 waits for aws, whose link is cut).
DEADLINE_S = 120


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
    started.append(
        gcs.spawn(emulator, "start", "--host", gcs.address, "--port", str(STORE_PORT), "--in-memory", log=logs / "gcs-store.log")
    )
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
    # Outside pytest's 0700 folders: the databases' own user must reach theirs.
    logs = Path(tempfile.mkdtemp(prefix="fedlib-hosts-drill-"))
    logs.chmod(0o755)
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
        prefect = HostedPrefect(hosts["prefect"], databases[0], logs / "prefect-home", logs)
        mlflow = HostedMlflow(hosts["mlflow"], databases[1], "s3://drill-mlflow/artifacts", checkpoint_url, logs)
        _at_once([prefect.start, mlflow.start])  # each its database's migrations: minutes one after the other

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
        # Each party on its own machine, at the same time, as they would (each CLI call starts Python anew).
        publics = dict(zip(parties, _at_once([party.key_init for party in parties.values()]), strict=True))
        drill = {"hosts": hosts, "publics": publics, "model": shared / "model", "mlflow": mlflow}
        federation = drill_config(drill, ROUNDS)
        _at_once([functools.partial(party.trust, federation) for party in parties.values()])
        for name, genre in CLIENT_PLAYS.items():
            parties[name].write_private("data/train.md", _corpus_text(corpus_dir, genre))
        parties[AGGREGATOR].write_private("data/held-out.md", (corpus_dir / "tragedies" / "macbeth.md").read_text())
        _at_once(
            [
                functools.partial(
                    prefect.cli, "work-pool", "create", pool, "--type", "process", "--base-job-template", str(LOCKED_PROCESS_POOL)
                )
                for pool in POOLS
            ]
        )
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
            shutil.rmtree(database.folder, ignore_errors=True)
        net.close()
        shutil.rmtree(shared, ignore_errors=True)


def _at_once(calls: list) -> list:
    """Each call in a thread of its own; their results in order (the first error is raised)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


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
            "storage_options": {"endpoint_url": hosts["s3-store"].url(STORE_PORT), "config_kwargs": copy.deepcopy(timeouts)},
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

    def sees(host: Host, expected: dict[tuple[str, int], str]) -> None:
        seen = dict(zip(expected, reachable(host, list(expected)), strict=True))
        wrong = {target: (seen[target], want) for target, want in expected.items() if seen[target] != want}
        assert not wrong, f"{host.name} saw (what it saw, what it should): {wrong}"

    for client, own in STORES.items():
        expected = {(hosts[own].address, STORE_PORT): "open"}
        expected[(hosts["checkpoint-store"].address, STORE_PORT)] = "open"
        expected[(hosts["prefect"].address, PREFECT_PORT)] = "open"
        for other in (s for c, s in STORES.items() if c != client):
            expected[(hosts[other].address, STORE_PORT)] = "unreachable"
        expected[(hosts["mlflow"].address, MLFLOW_PORT)] = "unreachable"
        for database in ("prefect-db", "mlflow-db"):
            expected[(hosts[database].address, PG_PORT)] = "unreachable"
        for other in (c for c in STORES if c != client):
            expected[(hosts[other].address, 22)] = "unreachable"
        # Nothing of another party's listens on this host's loopback.
        for port in (PREFECT_PORT, MLFLOW_PORT, STORE_PORT, INNER_PORT, PG_PORT):
            expected[("127.0.0.1", port)] = "refused"
        sees(hosts[client], expected)
    expected = {(hosts[store].address, STORE_PORT): "open" for store in (*STORES.values(), "checkpoint-store")}
    expected[(hosts["mlflow"].address, MLFLOW_PORT)] = "open"
    for database in ("prefect-db", "mlflow-db"):
        expected[(hosts[database].address, PG_PORT)] = "unreachable"
    sees(hosts[AGGREGATOR], expected)


def _start_federation(prefect: HostedPrefect, config: dict) -> str:
    out = prefect.cli("deployment", "run", "federated-training/federation", "--params", json.dumps({"config": config}))
    return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)


def test_a_federation_across_hosts_survives_the_faults_clouds_have(drill):
    prefect, parties, net, hosts, logs = drill["prefect"], drill["parties"], drill["net"], drill["hosts"], drill["logs"]
    databases = drill["databases"]
    config = drill_config(drill, ROUNDS)
    first = _start_federation(prefect, config)
    _run_running(prefect, first, 600)
    second = _start_federation(prefect, config)  # a schedule firing while the first is going: it waits its turn

    # 1. Round 1: the Prefect server restarts (on the same database) while the clients train.
    _clients_training(prefect, [f"{client}-round-1" for client in CLIENT_PLAYS], first, 600)
    prefect.restart()

    # 2. MLflow's database goes down under a tracking request, and is back once it was retried.
    mlflow_gate = GateControl(logs / "mlflow-gate.sock")
    mlflow_gate.arm(LOG_BATCH)
    held = mlflow_gate.held(600)
    databases["mlflow"].down()
    retried = GateControl(logs / "mlflow-gate.sock")
    retried.arm(LOG_BATCH)
    mlflow_gate.release()  # into a server whose database is gone: it answers 500
    assert retried.held(300) == held  # the same request again
    databases["mlflow"].up()
    retried.release()

    # 3. Round 2: aws's link goes down in the middle of its upload.
    aws_gate = GateControl(logs / "s3-store-gate.sock")
    aws_gate.arm(r"^PUT /drill-aws/fedlib/drill/round-0002/aws\.update", 0.5)
    aws_gate.held(600)
    net.cut(hosts["aws"])
    aws_gate.drop()  # what aws sent after the cut never arrives (the store's kernel had it already)

    # 4. Round 2's commit (at quorum, after the deadline): the checkpoint store's host is cut off
    # while the adapter is on its way, and stays so until the commit's first retry has failed too.
    checkpoint_gate = GateControl(logs / "checkpoint-store-gate.sock")
    checkpoint_gate.arm(r"^PUT /drill-checkpoints/fedlib/drill/round-0002/adapter-", 0.5)
    checkpoint_gate.held(DEADLINE_S + 300)
    net.cut(hosts["checkpoint-store"])
    checkpoint_gate.release()
    _task_failed_tries(prefect, "checkpoint-round-2", 2, 300)
    net.restore(hosts["checkpoint-store"])

    # Round 3 is under way: aws's link comes back, after round 2's deadline.
    _flow_run_running(prefect, "gcp-round-3", first, 600)
    net.restore(hosts["aws"])

    # 5. Round 3's commit: the aggregator's flow process dies between the adapter and the manifest.
    checkpoint_gate.arm(r"^PUT /drill-checkpoints/fedlib/drill/round-0003/manifest\.json")
    checkpoint_gate.held(600)
    waiting = prefect.client_call(lambda client: client.read_flow_run(second)).state
    assert waiting.is_scheduled(), waiting.name  # the second run waits its turn (one federation at a time)
    _kill_flow_processes(parties[AGGREGATOR])
    checkpoint_gate.drop()

    crashed = _finished(prefect, parties, first, 300)
    assert crashed.is_crashed(), f"{crashed.name}; logs in {logs}"
    final = _finished(prefect, parties, second, 600)  # the second run resumes the lineage
    assert final.is_completed(), f"{final.name}; logs in {logs}"

    # The lineage, read as any party would: from the checkpoint bucket, checked with the config's public key.
    settings = parse_config(config)
    store = CheckpointStore(
        settings.checkpoint_url, "drill", verifier=settings.keyring.publics.aggregator_signing, options=_operator(settings)
    )
    manifests = store.manifests()
    assert [m.round for m in manifests] == list(range(ROUNDS + 1))  # rounds 0..3, each once
    base, round_1, round_2, round_3 = manifests
    report = "\n".join(
        f"round {m.round}: {m.timings['round_s']:.1f} s partition to commit, {m.bytes_uploaded:,} B uploaded, "
        f"{m.bytes_crossing_clouds:,} B across clouds, accepted {', '.join(m.accepted)}"
        for m in manifests[1:]
    )
    (logs / "rounds.txt").write_text(report + "\n")
    print(report)  # shown with -s, and kept in the drill's logs
    for parent, child in zip(manifests, manifests[1:], strict=False):
        assert child.parent_adapter_sha256 == parent.adapter_sha256
    assert round_1.accepted == ["aws", "gcp", "azure"]  # through Prefect's restart
    assert sorted(round_2.accepted) == ["azure", "gcp"]  # at quorum without aws
    assert "aws" in round_2.stragglers or round_2.rejected["aws"].reason == "straggler"
    assert sorted(round_3.accepted) == ["aws", "azure", "gcp"]  # aws back
    assert str(_federation_of(prefect, round_3.prefect_flow_run_id)) == second  # committed by the run that resumed
    assert round_2.perplexity < base.perplexity and round_3.perplexity < base.perplexity

    # No run orphaned: every run the federations made ended (the killed run's round too, closed by
    # the run that resumed). The nightly schedule's future runs wait.
    runs = [run for run in _flow_runs(prefect) if not run.auto_scheduled]
    assert all(run.state.is_final() for run in runs), [(run.name, run.state.name) for run in runs if not run.state.is_final()]
    assert sorted(run.state.name for run in runs if run.name == "round-3") == ["Completed", "Crashed"]
    # aws's late run: the aggregator marked it Cancelled past the deadline (no worker could confirm
    # across the cut). Its own process, cut off too, goes on; once the link is back its upload may
    # get through or run out of retries, and either way the run stays Cancelled.
    (late,) = [run for run in runs if run.name == "aws-round-2"]
    assert late.state.is_cancelled(), f"{late.state.name}: {late.state.message}"

    # MLflow, on its PostgreSQL: each round's metrics logged once, none lost; each round registered once.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=drill["mlflow"].url, registry_uri=drill["mlflow"].url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "fedlib-drill"]
    steps = [
        m.step
        for run in client.search_runs([experiment.experiment_id])
        for m in client.get_metric_history(run.info.run_id, "eval/perplexity")
    ]
    assert sorted(steps) == list(range(ROUNDS + 1)), steps
    for run in client.search_runs([experiment.experiment_id]):
        history = client.get_metric_history(run.info.run_id, "round/accepted")
        assert len(history) == len({m.step for m in history}), [(m.step, m.timestamp) for m in history]
    rounds = [v.tags.get("round") for v in client.search_model_versions("name='fedlib-drill'")]
    assert sorted(rounds, key=int) == [str(r) for r in range(1, ROUNDS + 1)]

    # Each client trained on its own data only, as its own run's logs say (round 3's: what a run
    # logged while Prefect's server was down in round 1 never reached it, in Prefect's own way).
    for name in CLIENT_PLAYS:
        run = next(r for r in _flow_runs(prefect) if r.name == f"{name}-round-3")
        text = _logs(prefect, run.id)
        assert f"training on its own data only: file://{user(name).pw_dir}/drill/data/train.md" in text, text[-2000:]
        for other in CLIENT_PLAYS:
            if other != name:
                assert user(other).pw_dir not in text

    # The aggregator's processes opened no client's data, and could not have: it is another user's 0600 file.
    opened = drill["audit"].read_text().splitlines()
    assert any("drill-checkpoints" in line for line in opened)  # the audit saw the aggregator's reads
    for name in CLIENT_PLAYS:
        assert not any(user(name).pw_dir in line for line in opened), name
    assert parties[AGGREGATOR].run("cat", f"{user('aws').pw_dir}/drill/data/train.md").returncode != 0


LOG_BATCH = r"^POST /api/2\.0/mlflow/runs/log-batch"


def _operator(settings) -> dict:
    """The checkpoint store's options, with the operator's credentials (the parties' come from their environment)."""
    return {**settings.federation.checkpoint_options, "key": "test", "secret": "test"}


def _kill_flow_processes(party: Party) -> None:
    """The party's flow-run processes die at once; its worker (which reports the crash) lives."""
    # The worker is told apart by its parent (the `runuser` that `Host.spawn` started), not by its
    # command line: `ps` cuts that to $COLUMNS when it is set, and a long checkout path then hid
    # "worker start" and killed the worker too (so no one was left to report the crash).
    listed = subprocess.run(["ps", "-ww", "-u", party.account.pw_name, "-o", "pid=,ppid=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in listed.stdout.splitlines() if line.strip()]
    assert party.worker is not None
    workers = [row for row in rows if int(row[1]) == party.worker.pid]
    assert len(workers) == 1 and "worker start" in workers[0][2], listed.stdout
    doomed = [int(row[0]) for row in rows if int(row[1]) != party.worker.pid]
    assert doomed, listed.stdout
    for pid in doomed:
        subprocess.run(["kill", "-KILL", str(pid)], check=False)


def _wait_until(prefect: HostedPrefect, check, timeout: float, what: str, events: tuple[str, ...] = ("prefect.",)):
    """`check(client)`'s first truthy answer, looked for again at each Prefect event (it is
    called once after subscribing, so an earlier event is not missed)."""
    import anyio
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    async def watch(client):
        async with get_events_subscriber(filter=EventFilter(event=EventNameFilter(prefix=list(events)))) as stream:
            with anyio.move_on_after(timeout):
                while True:
                    found = await check(client)
                    if found:
                        return found
                    await anext(stream)
        return None

    found = prefect.client_call(watch)
    if not found:
        pytest.fail(f"{what} not within {timeout:.0f} s; logs in {prefect.logs}")
    return found


def _flow_run_running(prefect: HostedPrefect, name: str, watched_run, timeout: float):
    """The flow run called `name`, once it is Running; the drill fails at once if `watched_run` ends first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def check(client):
        state = (await client.read_flow_run(watched_run)).state
        assert not state.is_final(), f"{watched_run} ended {state.name} before {name} ran; logs in {prefect.logs}"
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return next((r for r in runs if r.state is not None and r.state.is_running()), None)

    return _wait_until(prefect, check, timeout, f"{name} running", ("prefect.flow-run.",))


def _run_running(prefect: HostedPrefect, run_id: str, timeout: float) -> None:
    async def check(client):
        state = (await client.read_flow_run(run_id)).state
        assert not state.is_final(), f"{run_id} ended {state.name}; logs in {prefect.logs}"
        return state.is_running()

    _wait_until(prefect, check, timeout, f"{run_id} running", ("prefect.flow-run.",))


def _clients_training(prefect: HostedPrefect, names: list[str], watched_run, timeout: float) -> None:
    """Until every one of the client runs `names` has started and one at least is still running."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def check(client):
        state = (await client.read_flow_run(watched_run)).state
        assert not state.is_final(), f"{watched_run} ended {state.name}; logs in {prefect.logs}"
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
        states = [r.state for r in runs if r.state is not None]
        started = len(states) == len(names) and all(s.is_running() or s.is_final() for s in states)
        return started and any(s.is_running() for s in states)

    _wait_until(prefect, check, timeout, f"{', '.join(names)} training", ("prefect.flow-run.",))


def _task_failed_tries(prefect: HostedPrefect, name: str, failures: int, timeout: float) -> None:
    """Until the task run called `name` has failed `failures` tries (each one an AwaitingRetry state)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def check(client):
        runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))
        for run in runs:
            states = await client.read_task_run_states(run.id)
            if sum(state.name == "AwaitingRetry" for state in states) >= failures:
                return True
        return False

    _wait_until(prefect, check, timeout, f"{failures} failed tries of {name}", ("prefect.task-run.",))


def _federation_of(prefect: HostedPrefect, round_run_id: str):
    """The federation run whose round subflow `round_run_id` is."""

    async def read(client):
        run = await client.read_flow_run(round_run_id)
        return (await client.read_task_run(run.parent_task_run_id)).flow_run_id

    return prefect.client_call(read)


def _flow_runs(prefect: HostedPrefect) -> list:
    return prefect.client_call(lambda client: client.read_flow_runs())


def _logs(prefect: HostedPrefect, run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read(client):
        return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))

    return "\n".join(log.message for log in prefect.client_call(read))


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
