"""Run one step on a set of clients, all at once, where the clients run: as tasks in this
process (`orchestration.dispatch: local`) or as each cloud's `client-training` deployment on its
own work pool. A client whose step fails is data for the round, not a crash; one that is not
done by the deadline is a straggler, left out of the round (a deployment run is cancelled).

Nothing comes back from a step but whether it finished: what a client has to say (its update
and report, its secure-aggregation messages) it writes, sealed, to its own bucket, which is the
only channel a client on another cloud shares with the aggregator."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from fedlib.config import ConfigError, FederationConfig
from fedlib.model.threads import thread_share
from fedlib.round.preflight import PreflightRequest
from fedlib.secagg.messages import RevealRequest, SetupRequest, TrainRequest
from tasks.client import submit_client_round
from tasks.dispatch import ClientRunLate, dispatch_client
from tasks.preflight import preflight_client
from tasks.secagg import secagg_reveal, secagg_setup

Request = SetupRequest | TrainRequest | RevealRequest | PreflightRequest


@dataclass(frozen=True)
class StepResults:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # client -> what went wrong
    late: list[str] = field(default_factory=list)  # not done by the deadline
    # seconds from dispatch until the aggregator saw each done client's step finish: its own clock,
    # an upper bound of the client's time (a client waited on after another is counted late)
    elapsed: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientSteps:
    config: FederationConfig
    round_number: int
    local_steps: dict[str, int]

    def _submit(self, client: str, step: str, secure: Request | None, deadline: float | None, threads: int) -> Any:
        c, r = self.config, self.round_number
        steps = self.local_steps.get(client, c.training.local_steps)
        if c.orchestration.dispatch == "deployments":
            request = secure.to_json() if secure is not None else None
            return dispatch_client.submit(c, client, r, step, request, steps, deadline)
        if step == "preflight":
            assert isinstance(secure, PreflightRequest)
            return preflight_client.submit(c, client, secure.probe_stores)
        if step == "train":
            return submit_client_round(c, client, r, secure, steps, threads)
        if step == "setup":
            return secagg_setup.submit(c, client, r, secure)
        return secagg_reveal.submit(c, client, r, secure)

    def run(
        self,
        step: str,
        clients: Iterable[str],
        secure: Callable[[str], Request | None] = lambda _: None,
        deadline_s: float | None = None,
    ) -> StepResults:
        """`secure(client)` gives that client's secagg inputs; `deadline_s` counts from now. A
        deployment run past the deadline is cancelled by its dispatch task, which then reports
        it late; local tasks past it are left to finish unread. Local clients training at once
        share this process's cores (`fedlib.model.threads`)."""
        started = time.time()
        deadline = None if deadline_s is None else started + deadline_s
        clients = list(clients)
        threads = thread_share(len(clients), self.config.training.torch_threads)
        futures = {client: self._submit(client, step, secure(client), deadline, threads) for client in clients}
        out = StepResults()
        local = self.config.orchestration.dispatch == "local"
        for client, future in futures.items():
            timeout = None if deadline is None or not local else max(0.01, deadline - time.time())
            try:
                future.result(timeout=timeout)
                out.done.append(client)
                out.elapsed[client] = time.time() - started
            except (TimeoutError, ClientRunLate) as err:
                out.late.append(client)
                get_run_logger().warning(
                    "round %d: %s is a straggler: no %s within %.0f s (%s)",
                    self.round_number,
                    client,
                    step,
                    deadline_s or 0,
                    err or "left running",
                )
            except Exception as err:  # noqa: BLE001 - recorded, and the round decides on quorum
                out.failed[client] = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
                get_run_logger().warning("round %d: %s %s failed: %s", self.round_number, client, step, out.failed[client])
        return out
