"""The drill's parties and servers, each on a host of its own (`tests.hosts`).

A party is an operating-system user (fedlib-aggregator, fedlib-aws, fedlib-gcp, fedlib-azure,
made by `scripts/drill-users`) with its own 0700 home holding its own working copy, state,
private key and (for a client) its training data, readable by it alone; its processes run on its
host as that user, with only its own credentials. The Prefect server and the MLflow tracking
server run on hosts of their own, each on its own PostgreSQL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from scripts.hosts import Host, wait_for_port
from tests.conftest import ROOT
from tests.postgres import PostgresCluster
from tests.prefect_api import client_call

VENV_BIN = Path(sys.executable).parent
PREFECT_PORT, MLFLOW_PORT, STORE_PORT, INNER_PORT = 4200, 5000, 9000, 9001
GATE = ROOT / "tests" / "drill" / "gate.py"


def user(party: str) -> pwd.struct_passwd:
    return pwd.getpwnam(f"fedlib-{party}")


def require_root_and_users(parties: tuple[str, ...]) -> None:
    if os.geteuid() != 0:
        pytest.fail("the drill runs parties as OS users on network namespaces: run the tests as root (CI does)")
    try:
        for party in parties:
            user(party)
    except KeyError:
        pytest.fail("the drill's users are missing: run `bash scripts/setup --tests` as root (it runs scripts/drill-users)")
    if shutil.which("nft") is None:
        pytest.fail("nft is missing: run `bash scripts/setup --tests` as root (it installs Debian's nftables)")


class Party:
    """One party's machine: its host, its home, its environment, its worker."""

    def __init__(self, name: str, host: Host, api_url: str, credentials: dict[str, str], logs: Path) -> None:
        self.name, self.host, self.logs = name, host, logs
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
            # A restart of the Prefect server takes ~10 s: the client rides it out rather than crash.
            "PREFECT_CLIENT_MAX_RETRIES": "12",
            "PYTHONPATH": str(self.work),  # this party's working copy, not the repository's
            "FEDLIB_ROOT": str(self.work),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            **credentials,
        }
        self.worker: subprocess.Popen | None = None
        self.killed = False
        self.pool = f"{'federation' if name == 'aggregator' else name}-pool"

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

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command on this party's host, as this party."""
        return self.host.run(*command, user=self.account.pw_name, env=self.env, cwd=self.work, timeout=timeout)

    def key_init(self) -> dict:
        done = self.run(str(VENV_BIN / "fedlib"), "keys", "init", "--party", self.name, "--out", str(self.drill / "key.pem"))
        assert done.returncode == 0, done.stderr
        return yaml.safe_load(done.stdout)

    def trust(self, config: dict) -> None:
        """The party checks the federation's fingerprints and trusts its keyring, on its own machine."""
        path = self.write_private("federation.yaml", yaml.safe_dump(config))
        done = self.run(str(VENV_BIN / "fedlib"), "keys", "trust", str(path), "--party", self.name)
        assert done.returncode == 0, done.stderr

    def start_worker(self) -> None:
        self.killed = False
        self.worker = self.host.spawn(
            str(VENV_BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            self.pool,
            "--type",
            "process",
            user=self.account.pw_name,
            env=self.env,
            cwd=self.work,
            log=self.logs / f"{self.pool}.log",
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


def _stop(process: subprocess.Popen | None) -> None:
    """TERM, TERM, then KILL (a server or worker may ignore the first TERM)."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            continue


class HostedPrefect:
    """Prefect's server on its host, its database on PostgreSQL on another."""

    def __init__(self, host: Host, database: PostgresCluster, home: Path, logs: Path) -> None:
        self.host, self.database, self.home, self.logs = host, database, home, logs
        self.url = f"{host.url(PREFECT_PORT)}/api"
        self.process: subprocess.Popen | None = None
        (home / "operator").mkdir(parents=True, exist_ok=True)  # Prefect makes its home without parents

    def start(self) -> HostedPrefect:
        env = {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database.url("prefect", "postgresql+asyncpg"),
            "PGPASSWORD": self.database.password,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            # The deployment's concurrency slot is a lease; in memory (the default) a restart
            # forgets it, and the running federation is told its slot is gone and stops.
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        }
        command = (str(VENV_BIN / "prefect"), "server", "start", "--host", self.host.address, "--port", str(PREFECT_PORT))
        self.process = self.host.spawn(*command, env=env, log=self.logs / "prefect-server.log")
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Prefect's server exited ({self.process.returncode}); see {self.logs}/prefect-server.log")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"Prefect server not healthy at {self.url}; see {self.logs}/prefect-server.log")

    def restart(self) -> None:
        _stop(self.process)
        self.start()

    def stop(self) -> None:
        _stop(self.process)

    def cli(self, *args: str, timeout: float = 180, unset: tuple[str, ...] = ()) -> str:
        env = {**os.environ, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(self.home / "operator"), "FEDLIB_ROOT": str(ROOT)}
        env = {k: v for k, v in env.items() if k not in unset}
        done = subprocess.run([str(VENV_BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def client_call(self, fn):
        return client_call(self.url, fn)


class HostedMlflow:
    """MLflow's tracking server on its host, behind a gate: its database on PostgreSQL on another
    host, its artifacts in the aggregator's bucket (S3), which only it reaches."""

    def __init__(self, host: Host, database: PostgresCluster, artifacts: str, s3_endpoint: str, logs: Path) -> None:
        self.host, self.database, self.artifacts, self.s3_endpoint, self.logs = host, database, artifacts, s3_endpoint, logs
        self.url = host.url(MLFLOW_PORT)
        self.gate = logs / "mlflow-gate.sock"
        self.processes: list[subprocess.Popen] = []

    def start(self) -> HostedMlflow:
        env = {
            "PGPASSWORD": self.database.password,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        command = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(INNER_PORT), "--workers", "1"]
        command += ["--backend-store-uri", self.database.url("mlflow"), "--artifacts-destination", self.artifacts]
        self.processes.append(self.host.spawn(*command, env=env, log=self.logs / "mlflow-server.log"))
        self.processes.append(start_gate(self.host, MLFLOW_PORT, INNER_PORT, self.gate, self.logs / "mlflow-gate.log"))
        wait_for_port(self.host.address, MLFLOW_PORT, what="the MLflow gate")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"MLflow's server exited; see {self.logs}/mlflow-server.log")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"MLflow server not healthy at {self.url}; see {self.logs}/mlflow-server.log")

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop(process)


def start_gate(host: Host, port: int, inner_port: int, control: Path, log: Path) -> subprocess.Popen:
    """tests/drill/gate.py on `host`: `host:port` forwarded to the host's own `127.0.0.1:inner_port`."""
    control.unlink(missing_ok=True)
    command = (sys.executable, str(GATE), host.address, str(port), "127.0.0.1", str(inner_port), str(control))
    process = host.spawn(*command, log=log)
    deadline = time.monotonic() + 30
    while not control.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"the gate on {host.name} did not start; see {log}")
        time.sleep(0.05)
    return process


class GateControl:
    """The drill's end of a gate: arm it, wait for the held request, release or drop it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket: socket.socket | None = None

    def arm(self, pattern: str, fraction: float = 0.0) -> None:
        self.socket = socket.socket(socket.AF_UNIX)
        self.socket.connect(str(self.path))
        self.socket.sendall(f"arm {fraction} {pattern}\n".encode())
        self.reader = self.socket.makefile()
        assert self.reader.readline().strip() == "armed"

    def held(self, timeout: float) -> str:
        """The held request's first line, once one has matched (waits on the gate's word)."""
        assert self.socket is not None, "arm the gate first"
        self.socket.settimeout(timeout)
        line = self.reader.readline().strip()
        assert line.startswith("hit "), f"the gate said {line!r}"
        return line[4:]

    def release(self) -> None:
        self._answer("release")

    def drop(self) -> None:
        self._answer("drop")

    def _answer(self, word: str) -> None:
        assert self.socket is not None
        self.socket.sendall(f"{word}\n".encode())
        self.socket.close()
        self.socket = None
