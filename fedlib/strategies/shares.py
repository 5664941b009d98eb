"""No client's weight past a bound share of the round's: a client's example count is its own word.

The count is held to what the round allows (`Expected`), but in a deployed federation the
aggregator does not know a client's shard, and the cap is then the configured maximum (10^9 by
default): one client with its real key could claim it and own the FedAvg mean. So the weights of
the round are water-filled: the largest are lowered to a common cap c at which each capped client
holds exactly `max_share` of the total, c = max_share · Σ min(n_k, c). Honest clients under the
bound keep their counts; a client over it weighs as much as the bound allows, never more. Where the
aggregator dealt the shards itself (the simulated mode) it knows each count, which is then a fact,
not a claim, and is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import replace

from fedlib.strategies.base import ClientUpdate


def capped_weights(weights: Mapping[str, int], max_share: float, known: Collection[str] = ()) -> dict[str, int]:
    """Each weight, lowered so that none is more than `max_share` of their sum (rounded down, so
    a capped share ends a hair under the bound). The weights of `known` clients, whose counts the
    aggregator checked against shards it dealt itself, are facts and stay as they are. Too few
    clients to all be under the bound weigh equally, the nearest the bound allows."""
    claimed = {client: w for client, w in weights.items() if client not in known}
    if not claimed or max_share >= 1:
        return dict(weights)
    if len(weights) * max_share < 1:
        equal = min(weights.values())
        return {client: equal for client in weights}
    fixed = sum(w for client, w in weights.items() if client in known)
    ordered = sorted(claimed.values(), reverse=True)
    cap = math.inf
    for capped in range(len(ordered) + 1):  # how many of the largest claims are lowered to the cap
        if capped * max_share >= 1:  # not reached when len(weights) * max_share >= 1; kept for safety
            cap = float(ordered[-1])
            break
        rest = fixed + sum(ordered[capped:])
        level = max_share * rest / (1 - capped * max_share)
        if (capped == len(ordered) or ordered[capped] <= level) and (capped == 0 or ordered[capped - 1] >= level):
            cap = math.inf if capped == 0 else level
            break
    if cap == math.inf:
        return dict(weights)
    return {client: max(1, min(w, math.floor(cap))) if client in claimed else w for client, w in weights.items()}


def capped_updates(updates: Iterable[ClientUpdate], max_share: float, known: Collection[str] = ()) -> Iterator[ClientUpdate]:
    """The round's updates with their counts capped by `capped_weights`. The cap depends on every
    count, so the updates are held together (a LoRA delta each, a few MB) before the first is
    passed on; with `max_share` ≥ 1 they stream one at a time as before."""
    if max_share >= 1:
        yield from updates
        return
    held = list(updates)
    weights = capped_weights({u.client: u.num_examples for u in held}, max_share, known)
    for update in held:
        yield replace(update, num_examples=weights[update.client])
