"""What the aggregator reads from its own store to close a round, the same for a plain round
(`tasks.aggregate`) and a secure one (`tasks.secagg`): its key ring, the last commit and its
adapter, the strategy's carried state, and the intake of this round's updates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlib.config import FederationConfig
from fedlib.round.broadcast import split_state
from fedlib.round.manifest import Manifest
from fedlib.update.chain import Expected
from fedlib.update.intake import RoundIntake
from fedlib.wire.keys import AGGREGATOR, KeyRing
from fedlib.wire.serialization import Tensors
from tasks.credentials import party_keys, storage_options
from tasks.from_config import aggregator_update_key, checkpoint_store, round_intake


@dataclass(frozen=True)
class AggregatorState:
    """The aggregator's side of round `round` before any update is read."""

    round: int
    ring: KeyRing
    previous: Manifest  # the last commit, verified with the aggregator's key
    global_adapter: Tensors  # its adapter: what every client trained from
    own_state: Tensors  # the strategy's state (a server optimiser's moments)
    residual: Tensors  # the broadcast's carried residual

    def intake(
        self,
        config: FederationConfig,
        clients: Sequence[str],
        failed: Mapping[str, str],
        late: Sequence[str],
        expected: Mapping[str, Expected],
        session: str = "",
    ) -> RoundIntake:
        """This round's updates to read: each client's object, opened with the key the aggregator
        shares with it, held to `expected` and bound to the parent adapter (and `session`)."""
        keys = {client: aggregator_update_key(self.ring, client) for client in clients}
        options = storage_options(config, clients)
        return round_intake(
            config,
            self.round,
            clients,
            keys,
            self.global_adapter,
            failed=failed,
            late=late,
            expected=expected,
            parent=self.previous.adapter_sha256,
            session=session,
            options=options,
        )


def aggregator_state(config: FederationConfig, round_number: int) -> AggregatorState:
    ring = party_keys(config, AGGREGATOR)
    store = checkpoint_store(config, ring)
    previous = store.manifest_read(round_number - 1)[0]
    global_adapter, _ = store.adapter_of(previous)
    own_state, residual = split_state(store.strategy_state_of(previous))
    return AggregatorState(round_number, ring, previous, global_adapter, own_state, residual)
