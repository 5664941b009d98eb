"""`fedlib ui CONFIG`: the Prefect UI and the MLflow UI on loopback, on this federation's own
stores, light enough for a laptop.

Prefect's server reads `PREFECT_HOME`'s database, the one the ephemeral API of `fedlib run`
wrote; MLflow's reads the config's tracking URI. MLflow runs one worker and no job runner
(`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`, ~1.5 GB less); both stop together on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console

from fedlib_cli.common import config_or_report


def ui_commands(tracking_uri: str, prefect_port: int, mlflow_port: int) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    return {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        "mlflow": [
            str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking_uri,
            "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        ],
    }  # fmt: skip


def _environment(prefect_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def _in_use(port: int) -> bool:
    """Whether a server already listens on loopback `port` (one would fail to bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_until_up(urls: dict[str, str], processes: dict[str, subprocess.Popen], timeout_s: float) -> None:
    """Polls each health URL; a server that exits first is an error naming it."""
    pending = dict(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        for name, url in list(pending.items()):
            if processes[name].poll() is not None:
                raise RuntimeError(f"the {name} UI server exited with code {processes[name].returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        del pending[name]
            except (urllib.error.URLError, OSError):
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not up after {timeout_s:.0f} s: {', '.join(pending)}")
        time.sleep(0.5)


def stop(processes: dict[str, subprocess.Popen]) -> None:
    """TERM, then TERM again, then KILL: Prefect's server may ignore the first."""
    for attempt in range(3):
        alive = [p for p in processes.values() if p.poll() is None]
        for process in alive:
            os.killpg(process.pid, signal.SIGKILL if attempt == 2 else signal.SIGTERM)
        for process in alive:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def ui_command(args: argparse.Namespace) -> int:
    console = Console()
    config = config_or_report(args.config, args.set)
    if config is None:
        return 2
    busy = [(flag, port) for flag, port in (("--prefect-port", args.prefect_port), ("--mlflow-port", args.mlflow_port)) if _in_use(port)]
    if busy:
        for flag, port in busy:
            console.print(
                f"{flag}: 127.0.0.1:{port} is in use (another server?); choose a free one with {flag} N",
                style="red",
                markup=False,
                soft_wrap=True,
            )
        return 2
    os.environ.setdefault("PREFECT_HOME", str(config.data_path / "prefect"))  # where `fedlib run` kept this federation's runs
    env = _environment(args.prefect_port)
    processes = {
        name: subprocess.Popen(
            command,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL if not args.verbose else None,
            stderr=subprocess.STDOUT if not args.verbose else None,
        )
        for name, command in ui_commands(config.tracking_uri, args.prefect_port, args.mlflow_port).items()
    }
    try:
        wait_until_up(
            {"prefect": f"http://127.0.0.1:{args.prefect_port}/api/health", "mlflow": f"http://127.0.0.1:{args.mlflow_port}/health"},
            processes,
            args.timeout,
        )
        console.print(f"Prefect UI: http://127.0.0.1:{args.prefect_port}/runs   (PREFECT_HOME={env.get('PREFECT_HOME', '~/.prefect')})")
        console.print(f"MLflow UI:  http://127.0.0.1:{args.mlflow_port}/#/models/{config.registered_model_name}   ({config.tracking_uri})")
        console.print("Ctrl-C stops both.", highlight=False)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(p.poll() is None for p in processes.values()):
            time.sleep(1)
        exited = [name for name, p in processes.items() if p.poll() is not None]
        console.print(f"[red]{', '.join(exited)} UI server exited[/red]")
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as err:
        console.print(f"[red]{err}[/red]")
        return 1
    finally:
        stop(processes)


def add_parser(sub) -> None:
    ui = sub.add_parser("ui", help="start the Prefect and MLflow UIs on loopback on this federation's data")
    ui.add_argument("config", help="the federation's YAML config: its MLflow store, and its data_dir's Prefect runs")
    ui.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="the same overrides the run was given (its closing line shows them)",
    )
    ui.add_argument("--prefect-port", type=int, default=4200, help="loopback port of the Prefect UI")
    ui.add_argument("--mlflow-port", type=int, default=5000, help="loopback port of the MLflow UI")
    ui.add_argument("--timeout", type=float, default=120, help="seconds to wait for both servers")
    ui.add_argument("-v", "--verbose", action="store_true", help="show the servers' own output")
    ui.set_defaults(handler=ui_command)
