"""What a person watching a federation wants to see, as typed events.

Each event is logged on the `fedlib.progress` logger with a readable message and the event
itself attached (`record.event`): the CLI draws its bars from the event, never from the text,
and Prefect's run logs (see `flows.progress_logs`) and any other log handler get the text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LOGGER = logging.getLogger("fedlib.progress")


@dataclass(frozen=True)
class PlanMade:
    first: int
    last: int

    def __str__(self) -> str:
        return f"plan: rounds {self.first}..{self.last}"


@dataclass(frozen=True)
class BaseScored:
    """Round 0's score, the base model's: beside round 1's training."""

    perplexity: float

    def __str__(self) -> str:
        return f"round 0 (base model): perplexity {self.perplexity:.2f}"


@dataclass(frozen=True)
class RoundStarted:
    round: int
    clients: tuple[str, ...]
    steps: dict[str, int]  # each client's step budget this round

    def __str__(self) -> str:
        return f"round {self.round} started: {', '.join(self.clients)}"


@dataclass(frozen=True)
class ClientStep:
    """One optimizer step of one client's local training."""

    client: str
    round: int
    step: int
    steps: int
    loss: float | None  # None under secure aggregation: the logs reach the orchestrator
    tokens_per_s: float

    def __str__(self) -> str:
        loss = "" if self.loss is None else f" loss {self.loss:.4f}"
        return f"client {self.client} round {self.round}: step {self.step}/{self.steps}{loss} ({self.tokens_per_s:.0f} tokens/s)"


@dataclass(frozen=True)
class ClientTrained:
    client: str
    round: int
    loss: float | None  # None under secure aggregation

    def __str__(self) -> str:
        loss = "" if self.loss is None else f": loss {self.loss:.4f}"
        return f"client {self.client} round {self.round} trained{loss}"


@dataclass(frozen=True)
class ClientRejected:
    client: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"client {self.client} rejected ({self.reason}): {self.detail}"


@dataclass(frozen=True)
class RoundDone:
    """A round's score has landed: beside the next round's training, after its commit."""

    round: int
    perplexity: float

    def __str__(self) -> str:
        return f"round {self.round} done: perplexity {self.perplexity:.2f}"


@dataclass(frozen=True)
class Stopped:
    reason: str
    before_round: int

    def __str__(self) -> str:
        return f"{self.reason}; stopping before round {self.before_round}"


Event = PlanMade | BaseScored | RoundStarted | ClientStep | ClientTrained | ClientRejected | RoundDone | Stopped
_WARNINGS = (ClientRejected, Stopped)


def emit(event: Event) -> None:
    level = logging.WARNING if isinstance(event, _WARNINGS) else logging.INFO
    LOGGER.log(level, "%s", event, extra={"event": event})
