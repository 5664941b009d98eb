"""Clouds that differ: who takes part in a round, how many local steps each runs, what a round
costs, and whether the federation can afford the next one."""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fedlib.config import BudgetConfig, CloudProfile, TrainingConfig

if TYPE_CHECKING:
    from fedlib.round.manifest import Manifest

DEADLINE_SHARE = 0.75  # of the round deadline, for local steps


def sample_clients(names: Sequence[str], per_round: int | None, seed: int, round_number: int) -> list[str]:
    """`per_round` of the clouds `names` (`federation.clients_per_round`), drawn from (seed,
    round): the same on every re-run."""
    names = list(names)
    k = per_round
    if k is None or k >= len(names):
        return names
    digest = hashlib.sha256(f"{seed}/sample/{round_number}".encode()).digest()
    chosen = set(random.Random(int.from_bytes(digest[:8], "little")).sample(names, k))
    return [n for n in names if n in chosen]


def seconds_per_step(training: TrainingConfig, profiles: Mapping[str, CloudProfile], previous: Manifest | None) -> float | None:
    """Seconds one local step takes at speed 1: the config's figure, else the median over the last
    round's clients of the aggregator's own clock (`round_trip_s`: dispatch to done) × speed ÷
    the steps it assigned. A client's stated `train_s` and `local_steps` never enter: one liar
    would otherwise move the median, and with it every other client's budget."""
    if training.seconds_per_step is not None:
        return training.seconds_per_step
    measured = [rate * profiles[client].speed for client, rate in _timed_rates(previous).items()]
    return statistics.median(measured) if measured else None


def _timed_rates(previous: Manifest | None) -> dict[str, float]:
    """Seconds per assigned step of each client the aggregator timed last round."""
    if previous is None:
        return {}
    return {
        client: seconds / previous.step_budgets[client]
        for client, seconds in previous.round_trip_s.items()
        if previous.step_budgets.get(client)
    }


def step_budgets(
    training: TrainingConfig,
    profiles: Mapping[str, CloudProfile],
    deadline: float | None,
    clients: Sequence[str],
    previous: Manifest | None,
) -> dict[str, int]:
    """Local steps per client this round. `equal`: training.local_steps for everyone (capped by
    capacity). `deadline`: what each cloud fits into 75% of the round deadline, leaving the rest
    for loading the model, uploading, and steps slower than the estimate; until a step has been
    timed, local_steps.

    A cloud's speed is only what its profile claims: one the aggregator timed last round is held
    to the slower of the two, and one that straggled last round gets half the steps it had then."""
    t = training
    spent = seconds_per_step(training, profiles, previous) if t.step_budget == "deadline" else None
    timed = _timed_rates(previous)
    budgets = {}
    for client in clients:
        profile = profiles[client]
        steps = t.local_steps
        if spent is not None and deadline is not None:
            rate = max(spent / profile.speed, timed.get(client, 0.0))
            steps = max(1, math.floor(DEADLINE_SHARE * deadline / rate))
            if previous and client in previous.stragglers and client in previous.step_budgets:
                steps = min(steps, max(1, previous.step_budgets[client] // 2))
        budgets[client] = min(steps, profile.capacity_steps or steps)
    return budgets


def emulated_pacing(training: TrainingConfig, profiles: Mapping[str, CloudProfile], client: str) -> tuple[float, float]:
    """(slowdown, minimum seconds per step) for `client` when one machine plays every cloud.
    With `training.seconds_per_step` each step takes at least that ÷ speed, the same on any
    machine; without it, the fastest cloud runs natively and one at half its speed takes twice
    as long as it would."""
    if not training.emulate_speed:
        return 1.0, 0.0
    speed = profiles[client].speed
    if training.seconds_per_step is not None:
        return 1.0, training.seconds_per_step / speed
    return max(p.speed for p in profiles.values()) / speed, 0.0


def budget_stop(budget: BudgetConfig, manifests: Sequence[Manifest]) -> str | None:
    """Why the next round must not start, if the bytes or money budget would be passed at the
    last round's rate; None while both hold."""
    trained = [m for m in manifests if m.round > 0]
    if not trained:
        return None
    b = budget
    if b.bytes is not None:
        spent = sum(m.bytes_crossing_clouds for m in trained)
        if spent + trained[-1].bytes_crossing_clouds > b.bytes:
            return f"byte budget: {spent:,} bytes moved, another round would pass budget.bytes={b.bytes:,}"
    if b.money is not None:
        spent_money = sum(sum(m.cost.values()) for m in trained)
        if spent_money + sum(trained[-1].cost.values()) > b.money:
            return f"money budget: {spent_money:.4f} spent, another round would pass budget.money={b.money}"
    return None
