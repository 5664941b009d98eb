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

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner

from fedlib.config import config_from
from fedlib.round.preflight import PreflightRequest
from fedlib.secagg.messages import REQUESTS
from flows.progress_logs import progress_in_run_logs
from tasks.client import submit_client_round
from tasks.dispatch import client_run_name
from tasks.job_lock import refuse_unlocked_job
from tasks.preflight import preflight_client
from tasks.secagg import secagg_reveal, secagg_setup


def _run_name() -> str:
    """The engine renames every run of this flow by it, so it must name the step too."""
    params = flow_run.parameters
    return client_run_name(params["client"], params["round_number"], params.get("step", "train"))


def _started_as_the_clients_deployment() -> None:
    """A run of the client's deployment must run this entrypoint with no locked job variable set
    (`tasks.job_lock`); a run with no deployment (a subflow, a test) has no job to check."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.deployment_id is None:
            return
        deployment = client.read_deployment(run.deployment_id)
    refuse_unlocked_job(deployment.entrypoint, run.job_variables, deployment.job_variables)


def _cancelled_meanwhile() -> State | None:
    """The aggregator cancels a run past the deadline; a worker that hears it kills the process.
    A client cut off from the API hears nothing, and the aggregator marks the run Cancelled
    itself (`tasks.dispatch.cancel_run`). Prefect lets a run leave Cancelled, so this process,
    once its step ends (an upload can get through when the link is back), would overwrite that
    with Completed or Failed. Read first: a cancelled run stays Cancelled, saying why. An API
    still out of reach says nothing, and then neither can this run's own final state."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.get_id()).state
    except Exception:  # noqa: BLE001 - unreachable after the client's own retries: nothing to keep
        return None
    if state is None or not (state.is_cancelled() or state.is_cancelling()):
        return None
    return Cancelled(message=f"{state.message or 'cancelled'}; this client's step ended after that (the round went on without it)")


@flow(name="client-training", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=2))
def client_training(
    config: dict[str, Any] | str,
    client: str,
    round_number: int,
    step: Literal["train", "setup", "reveal", "preflight"] = "train",
    secure: dict[str, Any] | None = None,
    local_steps: int | None = None,
) -> State | None:
    """`secure` is the step's secure-aggregation request as JSON (`fedlib.secagg.messages`):
    the session, this client's relayed inbox and the weight scale (`train`), or the survivors
    and the dropped clients (`reveal`); it is parsed and checked before use. `local_steps` is
    this cloud's step budget for the round when it differs from `training.local_steps`."""
    try:
        _run_step(config, client, round_number, step, secure, local_steps)
    except Exception as err:
        cancelled = _cancelled_meanwhile()
        if cancelled is None:
            raise
        get_run_logger().warning("%s failed after the run was cancelled: %s: %s", step, type(err).__name__, err)
        return cancelled
    return _cancelled_meanwhile()


def _run_step(
    config: dict[str, Any] | str,
    client: str,
    round_number: int,
    step: str,
    secure: dict[str, Any] | None,
    local_steps: int | None,
) -> None:
    _started_as_the_clients_deployment()
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
