"""Run one step on a set of clients, all at once, where the clients run: as tasks in this
process (`orchestration.dispatch: local`) or as each cloud's `client-training` deployment on its
own work pool. A client whose step fails is data for the round, not a crash."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from fedlib.client import ClientReport
from fedlib.config import FederationConfig
from tasks.client import submit_client_round
from tasks.dispatch import dispatch_client
from tasks.secagg import secagg_reveal, secagg_setup


@dataclass(frozen=True)
class ClientSteps:
    config: FederationConfig
    config_path: str | None
    round_number: int
    assignment: dict[str, list[int]]

    def _submit(self, client: str, step: str, secure: dict[str, Any]) -> Any:
        c, r = self.config, self.round_number
        if c.orchestration.dispatch == "deployments":
            if self.config_path is None:
                raise ValueError("orchestration.dispatch=deployments needs the config file's path for the client runs")
            return dispatch_client.submit(c, self.config_path, client, r, step, secure or None)
        if step == "train":
            return submit_client_round(c, client, r, self.assignment[client], secure or None)
        if step == "setup":
            return secagg_setup.submit(c, client, r, secure["session_id"])
        return secagg_reveal.submit(c, client, r, **secure)

    def _result(self, step: str, value: Any) -> Any:
        """Deployments return JSON; give every caller the local tasks' types."""
        if self.config.orchestration.dispatch != "deployments":
            return value
        return ClientReport(**value) if step == "train" else value["reveal"] if step == "reveal" else value

    def run(
        self, step: str, clients: Iterable[str], secure: Callable[[str], dict[str, Any]] = lambda _: {}
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """(results, failures) by client; `secure(client)` gives that client's secagg inputs."""
        futures = {client: self._submit(client, step, secure(client)) for client in clients}
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for client, future in futures.items():
            try:
                results[client] = self._result(step, future.result())
            except Exception as err:  # noqa: BLE001 - recorded, and the round decides on quorum
                failed[client] = f"{type(err).__name__}: {err}"
                get_run_logger().warning("round %d: %s %s failed: %s", self.round_number, client, step, failed[client])
        return results, failed
