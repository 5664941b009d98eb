"""One client's step of a round as its own flow, so it can be deployed on its cloud's work pool.

The federation's round flow starts it with `run_deployment`, passing the validated config itself
(no worker needs the repository's `configs/`); it touches only this client's data, key and
bucket. `step` is `train` (train, seal, upload), `preflight` (before a run's first round: open
every reference this client will, `tasks.preflight`), or, with secure aggregation, `setup`
(mask-key shares for the peers, before training) and `reveal` (shares for the aggregator, after). It
returns nothing the aggregator reads: what the client has to say is sealed into its bucket, so
the parties share no Prefect result storage.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from fedlib.config import config_from
from fedlib.round.preflight import PreflightRequest
from fedlib.secagg.messages import REQUESTS
from flows.progress_logs import progress_in_run_logs
from tasks.client import submit_client_round
from tasks.dispatch import client_run_name
from tasks.preflight import preflight_client
from tasks.secagg import secagg_reveal, secagg_setup


def _run_name() -> str:
    """The engine renames every run of this flow by it, so it must name the step too."""
    params = flow_run.parameters
    return client_run_name(params["client"], params["round_number"], params.get("step", "train"))


@flow(name="client-training", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=2))
def client_training(
    config: dict[str, Any] | str,
    client: str,
    round_number: int,
    step: Literal["train", "setup", "reveal", "preflight"] = "train",
    secure: dict[str, Any] | None = None,
    local_steps: int | None = None,
) -> None:
    """`secure` is the step's secure-aggregation request as JSON (`fedlib.secagg.messages`):
    the session, this client's relayed inbox and the weight scale (`train`), or the survivors
    and the dropped clients (`reveal`); it is parsed and checked before use. `local_steps` is
    this cloud's step budget for the round when it differs from `training.local_steps`."""
    settings = config_from(config)
    if step == "preflight":
        with progress_in_run_logs():
            preflight_client(settings, client, PreflightRequest.from_json(secure).probe_stores if secure is not None else False)
        return
    request = REQUESTS[step].from_json(secure) if secure is not None else None
    with progress_in_run_logs():  # this client's steps and loss in its own run's logs
        if step == "setup":
            secagg_setup(settings, client, round_number, request)
        elif step == "reveal":
            secagg_reveal(settings, client, round_number, request)
        else:
            submit_client_round(settings, client, round_number, request, local_steps).result()
