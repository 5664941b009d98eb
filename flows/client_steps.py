"""Run one step on a set of clients, all at once, where the clients run: as tasks in this
process (`orchestration.dispatch: local`) or as each cloud's `client-training` deployment on its
own work pool. A client whose step fails is data for the round, not a crash; one that is not
done by the deadline is a straggler, left out of the round (it may finish later, unread)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from fedlib.manifest import ClientReport
from fedlib.config import FederationConfig
from fedlib.decode import expect
from fedlib.secagg.messages import RevealRequest, SetupMessage, SetupRequest, TrainRequest
from tasks.client import submit_client_round
from tasks.dispatch import dispatch_client
from tasks.secagg import secagg_reveal, secagg_setup


Request = SetupRequest | TrainRequest | RevealRequest


@dataclass(frozen=True)
class StepResults:
    results: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # client -> what went wrong
    late: list[str] = field(default_factory=list)  # not done by the deadline


@dataclass(frozen=True)
class ClientSteps:
    config: FederationConfig
    config_path: str | None
    round_number: int
    assignment: dict[str, list[int]]
    local_steps: dict[str, int]

    def _submit(self, client: str, step: str, secure: Request | None) -> Any:
        c, r = self.config, self.round_number
        steps = self.local_steps.get(client, c.training.local_steps)
        if c.orchestration.dispatch == "deployments":
            if self.config_path is None:
                raise ValueError("orchestration.dispatch=deployments needs the config file's path for the client runs")
            request = secure.to_json() if secure is not None else None
            return dispatch_client.submit(c, self.config_path, client, r, step, request, steps)
        if step == "train":
            return submit_client_round(c, client, r, self.assignment[client], secure, steps)
        if step == "setup":
            return secagg_setup.submit(c, client, r, secure)
        return secagg_reveal.submit(c, client, r, secure)

    def _result(self, step: str, value: Any) -> Any:
        """Deployments return JSON; give every caller the local tasks' types (a client's answer
        crosses the decode boundary here)."""
        if self.config.orchestration.dispatch != "deployments":
            return value
        if step == "train":
            return ClientReport(**value)
        if step == "reveal":
            return expect(expect(value, dict, "reveal result").get("reveal"), str, "reveal")
        return SetupMessage.from_json(value)

    def run(
        self,
        step: str,
        clients: Iterable[str],
        secure: Callable[[str], Request | None] = lambda _: None,
        deadline_s: float | None = None,
    ) -> StepResults:
        """`secure(client)` gives that client's secagg inputs; `deadline_s` counts from now."""
        started = time.monotonic()
        futures = {client: self._submit(client, step, secure(client)) for client in clients}
        out = StepResults()
        for client, future in futures.items():
            timeout = None if deadline_s is None else max(0.01, started + deadline_s - time.monotonic())
            try:
                out.results[client] = self._result(step, future.result(timeout=timeout))
            except TimeoutError:
                out.late.append(client)
                get_run_logger().warning("round %d: %s is a straggler: no %s within %.0f s", self.round_number, client, step, deadline_s)
            except Exception as err:  # noqa: BLE001 - recorded, and the round decides on quorum
                out.failed[client] = f"{type(err).__name__}: {err}"
                get_run_logger().warning("round %d: %s %s failed: %s", self.round_number, client, step, out.failed[client])
        return out
