"""Split fine-tuning's stages: the server process, a client's training, the held-out score."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.model.base import attach_lora, load_base_model
from fedlib.round.client import client_seed
from fedlib.split.client import HttpTransport, SplitClient
from fedlib.split.trainer import Tensors
from tasks.credentials import party_keys
from tasks.from_config import load_data


@dataclass
class ServerProcess:
    """The server's middle blocks in a process of their own, on 127.0.0.1."""

    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class RunningServer:
    """A split server already running elsewhere (`split.server_url`, e.g. in a TEE): the flow
    neither starts nor stops it."""

    url: str

    def stop(self) -> None:
        pass


def open_server(config: FederationConfig, config_path: str) -> ServerProcess | RunningServer:
    """The server the flow trains against: the configured one, or a new process beside it."""
    if config.split.server_url is not None:
        return RunningServer(config.split.server_url.rstrip("/"))
    return start_server(config_path, config.split.server_timeout_s)


def start_server(config_path: str, timeout_s: float) -> ServerProcess:
    ready = Path(tempfile.mkdtemp(prefix="fedlib-split-")) / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.split_server", config_path, "--ready", str(ready)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])},
    )
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"split server did not start (exit {process.poll()})")
        time.sleep(0.2)
    return ServerProcess(process, f"http://127.0.0.1:{ready.read_text()}")


def connect_client(config: FederationConfig, client: str, url: str, keep_wire: bool = False) -> SplitClient:
    """A new session with the server at `url`: the client's slices, a fresh handshake, the
    server's attestation checked before anything else is sent."""
    model = attach_lora(load_base_model(config.model.source), config.lora, config.federation.seed)
    return SplitClient(
        model,
        config.split,
        party_keys(config, client),
        client,
        HttpTransport(url, config.split.server_timeout_s, keep_wire=keep_wire, max_reply_bytes=config.split.max_body_bytes),
    )


@task(name="split-train", task_run_name="split-train-{client}-round-{round_number}", cache_policy=NO_CACHE)
def split_train_client(
    config: FederationConfig,
    client: str,
    round_number: int,
    url: str,
    blocks: list[int],
    start: Tensors | None,
    mask: dict | None,
) -> dict[str, Any]:
    """Calibrate (the first client of the first round fixes the SPF masks), then train; returns
    this client's part, the mask, and each step's loss, bytes and seconds."""
    split = config.split
    shard = load_data(config).train.select(blocks)
    generator = torch.Generator().manual_seed(client_seed(config.federation.seed, client, round_number))
    worker = connect_client(config, client, url)
    if start is None:
        batches = [shard[_draw(len(shard), split.batch_size, generator)] for _ in range(split.calibration_batches)]
        mask = worker.calibrate(batches, mask)
    else:
        worker.trainer.use_mask(mask)
        worker.load_state(start)
    stats = [worker.train_step(shard[_draw(len(shard), split.batch_size, generator)]) for _ in range(split.steps)]
    get_run_logger().info("%s round %d: loss %.4f → %.4f", client, round_number, stats[0].loss, stats[-1].loss)
    return {"state": worker.state(), "mask": mask, "examples": len(shard), "steps": [vars(s) for s in stats]}


@task(name="split-evaluate", task_run_name="split-evaluate-round-{round_number}", cache_policy=NO_CACHE)
def split_evaluate(config: FederationConfig, round_number: int, url: str, state: Tensors | None, mask: dict | None) -> float:
    worker = connect_client(config, config.clouds[0].name, url)
    if state is not None:
        worker.trainer.use_mask(mask)
        worker.load_state(state)
    return worker.eval_loss(load_data(config).evaluation, config.evaluation.batch_size)


def _draw(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(n, (min(batch_size, n),), generator=generator)


@task(name="split-server-part", task_run_name="split-server-part", cache_policy=NO_CACHE)
def fetch_server_part(config: FederationConfig, url: str) -> Tensors:
    """The server's trained middle (LoRA and SPF), asked for over a session of the first client:
    the server answers no one without a session."""
    return connect_client(config, config.clouds[0].name, url).server_state()
