"""The separate-parties drill: a federation whose parties share nothing but the object stores and
the Prefect API.

Four operating-system users (fedlib-aggregator, fedlib-aws, fedlib-gcp, fedlib-azure, made by
`scripts/drill-users`), each with its own 0700 home holding its own working copy, state, private
key and (for the clients) its training data, readable by it alone. A Prefect server, four process
work pools and four workers, each worker running as its party's user with only its own
credentials. The S3, GCS and Azure emulators on 127.0.0.1 are the three clouds' buckets; the
signed checkpoints live in the GCS one. The federation is started with `prefect deployment run`,
its config passed as data; one client's machine dies in round 2 and comes back for round 3, and a
second run is started while the first is going.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from fedlib.config import parse_config
from fedlib.round.checkpoint import CheckpointStore
from fedlib.wire.keys import AGGREGATOR
from tests.conftest import PLAYS, ROOT
from tests.test_deployments import POOLS, PrefectServer

PARTIES = ("aggregator", "aws", "gcp", "azure")
CLIENT_PLAYS = {"aws": "tragedies", "gcp": "comedies", "azure": "histories"}  # each cloud's own text
VENV_BIN = Path(sys.executable).parent
ROUNDS = 3
DEADLINE_S = 100


def user(party: str) -> pwd.struct_passwd:
    return pwd.getpwnam(f"fedlib-{party}")


def _require_users() -> None:
    if os.geteuid() != 0:
        pytest.fail("the separate-parties drill runs parties as OS users: run the tests as root (CI does)")
    try:
        for party in PARTIES:
            user(party)
    except KeyError:
        pytest.fail("the drill's users are missing: run `bash scripts/drill-users` as root (scripts/setup --tests does)")


def as_party(party: str, *command: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    account = user(party)
    return subprocess.run(
        ["runuser", "-u", account.pw_name, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command],
        capture_output=True,
        text=True,
        **kwargs,
    )


class Party:
    """One party's machine: its home, its environment, its worker."""

    def __init__(self, name: str, api_url: str, credentials: dict[str, str]) -> None:
        self.name = name
        self.account = user(name)
        self.home = Path(self.account.pw_dir)
        self.drill = self.home / "drill"
        self.work = self.drill / "work"
        self.env = {
            "HOME": str(self.home),
            "USER": self.account.pw_name,
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(self.drill / "prefect"),
            "TMPDIR": str(self.drill / "tmp"),  # the process worker's runner storage, among others
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PYTHONPATH": str(self.work),  # this party's working copy, not the repository's
            "FEDLIB_ROOT": str(self.work),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            **credentials,
        }
        self.worker: subprocess.Popen | None = None
        self.killed = False
        self.pool = f"{'federation' if name == AGGREGATOR else name}-pool"

    def chown(self, path: Path) -> None:
        subprocess.run(["chown", "-R", f"{self.account.pw_uid}:{self.account.pw_gid}", str(path)], check=True)

    def prepare(self) -> None:
        """A fresh 0700 home with its own working copy (the tracked files of this repository)."""
        shutil.rmtree(self.drill, ignore_errors=True)
        self.work.mkdir(parents=True)
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            if (ROOT / name).is_file():
                (self.work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, self.work / name)
        (self.drill / "data").mkdir()
        (self.drill / "tmp").mkdir()
        self.home.chmod(0o700)
        self.chown(self.drill)

    def write_private(self, relative: str, text: str) -> Path:
        path = self.drill / relative
        path.write_text(text)
        path.chmod(0o600)
        self.chown(path)
        return path

    def key_init(self) -> dict:
        done = as_party(
            self.name,
            str(VENV_BIN / "fedlib"),
            "keys",
            "init",
            "--party",
            self.name,
            "--out",
            str(self.drill / "key.pem"),
            env=self.env,
            cwd=self.work,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return yaml.safe_load(done.stdout)

    def trust(self, config: dict) -> None:
        """The party checks the federation's fingerprints and trusts its keyring, on its own machine."""
        path = self.write_private("federation.yaml", yaml.safe_dump(config))
        done = as_party(
            self.name, str(VENV_BIN / "fedlib"), "keys", "trust", str(path), "--party", self.name, env=self.env, cwd=self.work, timeout=120
        )
        assert done.returncode == 0, done.stderr

    def start_worker(self, logs: Path) -> None:
        pool, self.killed = self.pool, False
        log = open(logs / f"{pool}.log", "a")
        self.worker = subprocess.Popen(
            [
                "runuser",
                "-u",
                self.account.pw_name,
                "--",
                "env",
                "-i",
                *(f"{k}={v}" for k, v in self.env.items()),
                str(VENV_BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
            ],
            cwd=self.work,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """The machine dies: every process of this party, at once."""
        self.killed = True
        subprocess.run(["pkill", "-KILL", "-u", self.account.pw_name], check=False)
        if self.worker is not None:
            self.worker.wait(10)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def _corpus_text(corpus_dir: Path, genre: str) -> str:
    return "\n\n".join((corpus_dir / genre / f"{play}.md").read_text() for play in PLAYS[genre] if play != "macbeth")


@pytest.fixture(scope="module")
def drill(tmp_path_factory, corpus_dir, tiny_model_dir, emulators):
    _require_users()
    shared = Path(tempfile.mkdtemp(prefix="fedlib-drill-"))  # public, read-only: the base model only
    shared.chmod(0o755)
    shutil.copytree(tiny_model_dir, shared / "model")
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    server = PrefectServer(tmp_path_factory.mktemp("drill-prefect"), emulators)
    azure = emulators["azure"].connection_string
    s3 = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    credentials = {
        "aggregator": {**s3, "AZURE_STORAGE_CONNECTION_STRING": azure},  # reads every client's bucket
        "aws": s3,
        "gcp": {},  # the GCS emulator is anonymous
        "azure": {"AZURE_STORAGE_CONNECTION_STRING": azure},
    }
    parties = {name: Party(name, server.url, credentials[name]) for name in PARTIES}
    audit = parties[AGGREGATOR].drill / "opens.log"
    parties[AGGREGATOR].env.update(
        PYTHONPATH=f"{parties[AGGREGATOR].work}:{parties[AGGREGATOR].work / 'tests' / 'drill'}", FEDLIB_AUDIT_OPENS=str(audit)
    )
    try:
        for party in parties.values():
            party.prepare()
        publics = {name: party.key_init() for name, party in parties.items()}
        federation = drill_config({"emulators": emulators, "publics": publics, "model": shared / "model"}, ROUNDS)
        for party in parties.values():
            party.trust(federation)
        for name, genre in CLIENT_PLAYS.items():
            parties[name].write_private("data/train.md", _corpus_text(corpus_dir, genre))
        held_out = (corpus_dir / "tragedies" / "macbeth.md").read_text()
        parties[AGGREGATOR].write_private("data/held-out.md", held_out)
        server.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(server.port))
        server.wait_healthy()
        for pool in POOLS:
            server.cli("work-pool", "create", pool, "--type", "process")
        # Deployed without FEDLIB_ROOT, the pull step's `{{ $FEDLIB_ROOT }}` is left for each
        # worker to fill in from its own environment: each party runs its own working copy.
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.process.yaml", unset=("FEDLIB_ROOT",))
        for party in parties.values():
            party.start_worker(server.logs)
        yield {"server": server, "parties": parties, "publics": publics, "model": shared / "model", "emulators": emulators, "audit": audit}
    finally:
        for party in parties.values():
            party.stop()
        server.stop()
        shutil.rmtree(shared, ignore_errors=True)


def drill_config(drill, rounds: int) -> dict:
    """The federation's config as data: nothing in it is a secret, a path on the aggregator's
    disk, or a file any worker must hold. `~` is each party's own home."""
    emulators, publics = drill["emulators"], drill["publics"]
    clouds = [
        {
            "name": "aws",
            "provider": "aws",
            "storage": "s3://drill-aws/fedlib",
            "storage_options": {"endpoint_url": emulators["s3"].url},
            "work_pool": "aws-pool",
        },
        {
            "name": "gcp",
            "provider": "gcp",
            "storage": "gs://drill-gcp/fedlib",
            "storage_options": {"endpoint_url": emulators["gcs"].url, "token": "anon"},
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
            "checkpoints": "gs://drill-checkpoints/fedlib",
            "checkpoint_options": {"endpoint_url": emulators["gcs"].url, "token": "anon"},
        },
        "model": {"source": str(drill["model"])},
        "data": {"seq_len": 32},
        "evaluation": {"data": [f"file://{user(AGGREGATOR).pw_dir}/drill/data/held-out.md"], "max_blocks": 8, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"rounds": rounds, "local_steps": 4, "batch_size": 4, "learning_rate": 0.01},
        "aggregation": {"strategy": "fedavg", "min_clients": 2},
        "orchestration": {"dispatch": "deployments", "round_deadline_s": DEADLINE_S, "client_timeout_s": 300, "cancel_grace_s": 10},
        "keyring": {
            "aggregator": publics[AGGREGATOR]["aggregator"],
            "clients": {name: publics[name]["clients"][name] for name in CLIENT_PLAYS},
            "key_source": "file:~/drill/key.pem",
        },
        "clouds": clouds,
    }


def _api(server: PrefectServer, fn):
    return server.client_call(fn)


def _start_federation(server: PrefectServer, config: dict) -> str:
    out = server.cli("deployment", "run", "federated-training/federation", "--params", json.dumps({"config": config}))
    return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)


def _flow_runs(server: PrefectServer, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def read(client):
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))

    return _api(server, read)


def _state(server: PrefectServer, run_id: str):
    async def read(client):
        return (await client.read_flow_run(run_id)).state

    return _api(server, read)


def _workers_report(server: PrefectServer, parties: dict) -> str:
    lines = []
    for party in parties.values():
        if party.worker is not None and party.worker.poll() is not None and not party.killed:
            log = (server.logs / f"{party.pool}.log").read_text()[-3000:]
            lines.append(f"{party.name}'s worker exited ({party.worker.returncode}):\n{log}")
    return "\n".join(lines) or f"workers alive; logs in {server.logs}"


def _finished(server: PrefectServer, parties: dict, run_id, timeout: float):
    """The run's final state, waited for on the server's event stream."""
    from prefect.exceptions import FlowRunWaitTimeout
    from prefect.flow_runs import wait_for_flow_run

    try:
        return server.client_call(lambda client: wait_for_flow_run(run_id, timeout=int(timeout), client=client)).state
    except FlowRunWaitTimeout:
        pytest.fail(f"flow run {run_id} not finished within {timeout:.0f} s; {_workers_report(server, parties)}")


def _started_running(server: PrefectServer, parties: dict, name: str, watched_run, timeout: float):
    """The flow run called `name`, once it is Running, waited for on the server's event stream
    (its current state is read after subscribing, so an earlier event is not missed). If
    `watched_run` ends first, the drill fails there and then."""
    import anyio
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    async def watch(client):
        async with get_events_subscriber(filter=EventFilter(event=EventNameFilter(prefix=["prefect.flow-run."]))) as events:
            with anyio.move_on_after(timeout):
                while True:
                    state = (await client.read_flow_run(watched_run)).state
                    assert not state.is_final(), f"{watched_run} ended {state.name} before {name} ran; logs in {server.logs}"
                    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
                    running = next((r for r in runs if r.state is not None and r.state.is_running()), None)
                    if running is not None:
                        return running
                    await anext(events)  # a flow run changed state: look again
        return None

    found = server.client_call(watch)
    if found is None:
        pytest.fail(f"{name} not running within {timeout:.0f} s; {_workers_report(server, parties)}")
    return found


def _logs(server: PrefectServer, run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read(client):
        return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))

    return "\n".join(log.message for log in _api(server, read))


def test_parties_share_only_the_stores_and_the_api(drill):
    server, parties = drill["server"], drill["parties"]
    config = drill_config(drill, ROUNDS)
    first = _start_federation(server, config)

    # Round 2: once aws's client run is running, aws's machine dies (worker and run with it).
    aws_round_2 = _started_running(server, parties, "aws-round-2", first, 600)
    parties["aws"].kill()
    # A second federation run, started while the first is going (a schedule firing, say).
    second = _start_federation(server, drill_config(drill, 1))
    cancelled = _finished(server, parties, aws_round_2.id, DEADLINE_S + 120)
    assert cancelled.is_cancelled(), cancelled.name  # cancelled through the API, and its state says so
    parties["aws"].start_worker(server.logs)  # the machine is back before round 3

    final = _finished(server, parties, first, 600)
    assert final.is_completed(), f"{final.name}; logs in {server.logs}"
    assert not _state(server, second).is_completed()  # held while the first ran (concurrency limit 1)
    final = _finished(server, parties, second, 400)
    assert final.is_completed(), f"{final.name}; logs in {server.logs}"

    # The lineage, read as any party would: from the checkpoint bucket, checked with the config's public key.
    settings = parse_config(config)
    store = CheckpointStore(
        settings.checkpoint_url,
        "drill",
        verifier=settings.keyring.publics.aggregator_signing,
        options=settings.federation.checkpoint_options,
    )
    manifests = store.manifests()
    assert [m.round for m in manifests] == list(range(ROUNDS + 2))  # rounds 0..4, each once
    assert store.latest_round() == ROUNDS + 1
    base, round_1, round_2, round_3 = manifests[0], manifests[1], manifests[2], manifests[3]
    assert round_1.accepted == ["aws", "gcp", "azure"]
    assert round_2.perplexity < base.perplexity and round_1.perplexity < base.perplexity
    assert sorted(round_2.accepted) == ["azure", "gcp"]  # quorum without aws
    assert "aws" in round_2.stragglers or round_2.rejected["aws"].reason == "straggler"
    assert sorted(round_3.accepted) == ["aws", "azure", "gcp"]  # aws rejoined
    assert manifests[4].parent_adapter_sha256 == round_3.adapter_sha256  # the second run continued the lineage
    for manifest in manifests[1:]:
        for report in manifest.clients.values():
            assert report.validation_loss is None or report.validation_loss > 0

    # Each client trained on its own data only, as its own run's logs say.
    for name in CLIENT_PLAYS:
        run = next(r for r in _flow_runs(server, f"{name}-round-1"))
        text = _logs(server, run.id)
        assert f"training on its own data only: file://{user(name).pw_dir}/drill/data/train.md" in text, text[-2000:]
        for other in CLIENT_PLAYS:
            if other != name:
                assert user(other).pw_dir not in text

    # The aggregator's processes opened no client's data, and could not have: it is another user's 0600 file.
    opened = drill["audit"].read_text().splitlines()
    assert any("drill-checkpoints" in line for line in opened)  # the audit saw the aggregator's reads
    for name in CLIENT_PLAYS:
        assert not any(user(name).pw_dir in line for line in opened), name
    assert as_party(AGGREGATOR, "cat", f"{user('aws').pw_dir}/drill/data/train.md", env={"PATH": "/usr/bin:/bin"}).returncode != 0

    # The registry shows each round once.
    state = parties[AGGREGATOR].drill / "state"
    import mlflow

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    rounds = [v.tags.get("round") for v in client.search_model_versions("name='fedlib-drill'")]
    assert sorted(rounds, key=int) == [str(r) for r in range(1, ROUNDS + 2)]
