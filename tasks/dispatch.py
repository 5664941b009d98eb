"""Start a client's step on its own cloud's work pool and wait for it, up to a deadline."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from fedlib.config import FederationConfig


class ClientRunFailed(RuntimeError):
    """The client's deployment run did not complete in time or ended in a non-completed state."""


def client_run_name(client: str, round_number: int, step: str) -> str:
    """Training keeps the plain name; the secure-aggregation steps say which step they are."""
    return f"{client}-round-{round_number}" + ("" if step == "train" else f"-secagg-{step}")


@task(name="dispatch-client", task_run_name="dispatch-{client}-{step}-round-{round_number}", cache_policy=NO_CACHE)
def dispatch_client(
    config: FederationConfig,
    config_path: str,
    client: str,
    round_number: int,
    step: str = "train",
    secure: dict[str, Any] | None = None,
    local_steps: int | None = None,
) -> Any:
    """The client flow's JSON result: a report for `train`, a message for the secagg steps."""
    deployment = config.orchestration.client_deployment.format(cloud=client)
    timeout = config.orchestration.client_timeout_s
    parameters: dict[str, Any] = {"config_path": config_path, "client": client, "round_number": round_number}
    if step != "train" or secure:
        parameters.update(step=step, secure=secure)
    if step == "train" and local_steps is not None and local_steps != config.training.local_steps:
        parameters["local_steps"] = local_steps
    run = run_deployment(
        deployment, parameters=parameters, flow_run_name=client_run_name(client, round_number, step), timeout=timeout
    )
    state = run.state
    if state is None or not state.is_completed():
        status = state.name if state else "no state"
        raise ClientRunFailed(f"{deployment}: flow run {run.name} is {status} after up to {timeout:.0f} s")
    return state.result()
