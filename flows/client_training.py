"""One client's step of a round as its own flow, so it can be deployed on its cloud's work pool.

The federation's round flow starts it with `run_deployment`; it reads the same config file and
touches only this client's shard, keys and bucket. `step` is `train` (train, seal, upload), or,
with secure aggregation, `setup` (mask-key shares for the peers, before training) and `reveal`
(shares for the aggregator, after). Its return value (metrics and sealed messages, never
tensors) is persisted as JSON for the round flow to read.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from fedlib.config import load_config
from fedlib.secagg.messages import REQUESTS
from tasks.client import submit_client_round
from tasks.data import partition_data
from tasks.dispatch import client_run_name
from tasks.secagg import secagg_reveal, secagg_setup


def _run_name() -> str:
    """The engine renames every run of this flow by it, so it must name the step too."""
    params = flow_run.parameters
    return client_run_name(params["client"], params["round_number"], params.get("step", "train"))


@flow(
    name="client-training",
    flow_run_name=_run_name,
    persist_result=True,
    result_serializer="json",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
)
def client_training(
    config_path: str,
    client: str,
    round_number: int,
    step: Literal["train", "setup", "reveal"] = "train",
    secure: dict[str, Any] | None = None,
    local_steps: int | None = None,
) -> dict[str, Any]:
    """`secure` is the step's secure-aggregation request as JSON (`fedlib.secagg.messages`):
    the session, this client's relayed inbox and the weight scale (`train`), or the survivors
    and the dropped clients (`reveal`); it is parsed and checked before use. `local_steps` is
    this cloud's step budget for the round when it differs from `training.local_steps`."""
    config = load_config(config_path)
    request = REQUESTS[step].from_json(secure) if secure is not None else None
    if step == "setup":
        return secagg_setup(config, client, round_number, request).to_json()
    if step == "reveal":
        return {"reveal": secagg_reveal(config, client, round_number, request)}
    blocks = partition_data(config)[client]
    client_round = submit_client_round(config, client, round_number, blocks, request, local_steps)
    return asdict(client_round.result())
