"""Start a client's round on its own cloud's work pool and wait for it, up to a deadline."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from fedlib.config import FederationConfig
from fedlib.client import ClientReport


class ClientRunFailed(RuntimeError):
    """The client's deployment run did not complete in time or ended in a non-completed state."""


@task(name="dispatch-client", task_run_name="dispatch-{client}-round-{round_number}", cache_policy=NO_CACHE)
def dispatch_client(config: FederationConfig, config_path: str, client: str, round_number: int) -> ClientReport:
    deployment = config.orchestration.client_deployment.format(cloud=client)
    timeout = config.orchestration.client_timeout_s
    run = run_deployment(
        deployment,
        parameters={"config_path": config_path, "client": client, "round_number": round_number},
        flow_run_name=f"{client}-round-{round_number}",
        timeout=timeout,
    )
    state = run.state
    if state is None or not state.is_completed():
        status = state.name if state else "no state"
        raise ClientRunFailed(f"{deployment}: flow run {run.name} is {status} after up to {timeout:.0f} s")
    return ClientReport(**state.result())
