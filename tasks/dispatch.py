"""Start a client's step on its own cloud's work pool and wait for it, up to a deadline; a run
past the deadline is cancelled through the Prefect API, so it stops running (and billing)."""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import FlowRunWaitTimeout
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync

from fedlib.config import FederationConfig


class ClientRunFailed(RuntimeError):
    """The client's deployment run ended in a state other than completed."""


class ClientRunLate(RuntimeError):
    """The client's deployment run was not done by the deadline; it has been cancelled."""


def client_run_name(client: str, round_number: int, step: str) -> str:
    """Training keeps the plain name; the secure-aggregation steps say which step they are."""
    if step == "train":
        return f"{client}-round-{round_number}"
    return f"{client}-round-{round_number}-" + (step if step == "preflight" else f"secagg-{step}")


def cancel_run(run_id, why: str, grace_s: float) -> str:
    """Ask the run's worker to stop it (Cancelling); a worker that is alive kills the process and
    confirms (Cancelled), which this waits for on Prefect's event stream. If none confirms within
    `grace_s` (the worker itself is gone, and the run's process with it), the run is marked
    Cancelled here, so its state says what happened."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message=why), force=True)
        try:
            run = run_coro_as_sync(wait_for_flow_run(run_id, timeout=math.ceil(grace_s)))
            return run.state.name if run.state is not None else "no state"
        except FlowRunWaitTimeout:
            client.set_flow_run_state(run_id, Cancelled(message=f"{why}; no worker confirmed within {grace_s:.0f} s"), force=True)
            return "Cancelled"


@task(name="dispatch-client", task_run_name="dispatch-{client}-{step}-round-{round_number}", cache_policy=NO_CACHE)
def dispatch_client(
    config: FederationConfig,
    client: str,
    round_number: int,
    step: str = "train",
    secure: dict[str, Any] | None = None,
    local_steps: int | None = None,
    deadline: float | None = None,
) -> str:
    """Runs `client-training/<cloud>` with the validated config itself as a parameter (no worker
    needs a config file); returns the flow run's id. `deadline` is a wall-clock time."""
    orchestration = config.orchestration
    deployment = orchestration.client_deployment.format(cloud=client)
    timeout = orchestration.client_timeout_s
    if deadline is not None:
        timeout = min(timeout, max(1.0, deadline - time.time()))
    parameters: dict[str, Any] = {"config": config.model_dump(mode="json"), "client": client, "round_number": round_number}
    if step != "train" or secure:
        parameters.update(step=step, secure=secure)
    if step == "train" and local_steps is not None and local_steps != config.training.local_steps:
        parameters["local_steps"] = local_steps
    run = run_deployment(deployment, parameters=parameters, flow_run_name=client_run_name(client, round_number, step), timeout=timeout)
    state = run.state
    if state is not None and state.is_completed():
        return str(run.id)
    if state is None or not state.is_final():
        why = f"{client} {step} not done within {timeout:.0f} s (round {round_number})"
        final = cancel_run(run.id, why, orchestration.cancel_grace_s)
        get_run_logger().warning("%s: flow run %s cancelled (%s)", deployment, run.name, final)
        raise ClientRunLate(f"flow run {run.name} cancelled after {timeout:.0f} s")
    said = f": {state.message}" if state.message else ""
    raise ClientRunFailed(f"{deployment}: flow run {run.name} is {state.name}{said}")
