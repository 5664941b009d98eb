"""One client's round as its own flow, so it can be deployed on its cloud's work pool.

The federation's round flow starts it with `run_deployment`; it reads the same config file,
trains on this client's shard and uploads the sealed update to this client's bucket. Its return
value (metrics only, no tensors) is persisted as JSON for the round flow to read.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fedlib.config import load_config
from tasks.client import submit_client_round
from tasks.data import partition_data


@flow(
    name="client-training",
    flow_run_name="{client}-round-{round_number}",
    persist_result=True,
    result_serializer="json",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
)
def client_training(config_path: str, client: str, round_number: int) -> dict[str, Any]:
    config = load_config(config_path)
    blocks = partition_data(config)[client]
    return asdict(submit_client_round(config, client, round_number, blocks).result())
