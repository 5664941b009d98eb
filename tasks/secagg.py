"""Secure aggregation's extra steps around a round: the clients' setup and reveal, and the
aggregator's masked sum and unmasking. The clients' steps run where the clients run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedlib.aggregator import AggregationReport, Expected, build_strategy
from fedlib.config import FederationConfig
from fedlib.federation import (
    Tensors,
    aggregator_update_key,
    checkpoint_store,
    client_update_key,
    keyring,
    reveal_ledger,
    secagg_session,
)
from fedlib.secagg.aggregator import MaskedSum, finish_secure_round, sum_masked_updates
from fedlib.secagg.messages import RevealRequest, SetupMessage, SetupRequest
from fedlib.secagg.protocol import make_reveal, make_setup, open_inbox
from tasks.storage import storage_options


@task(name="secagg-setup", task_run_name="secagg-setup-{client}-round-{round_number}", cache_policy=NO_CACHE)
def secagg_setup(config: FederationConfig, client: str, round_number: int, request: SetupRequest) -> SetupMessage:
    return make_setup(keyring(config), client, secagg_session(config, round_number, request.session_id))


@task(name="secagg-reveal", task_run_name="secagg-reveal-{client}-round-{round_number}", cache_policy=NO_CACHE)
def secagg_reveal(config: FederationConfig, client: str, round_number: int, request: RevealRequest) -> str:
    """Answers once per session; see `fedlib.client_state.RevealLedger`."""
    ring = keyring(config)
    session = secagg_session(config, round_number, request.session_id)
    peers = open_inbox(ring, client, session, request.inbox)
    ledger = reveal_ledger(config, ring, client, storage_options(config, [client])[client])
    key = client_update_key(ring, client)
    return make_reveal(ring, client, session, peers, request.survivors, request.dropped, key, ledger)


@task(name="sum-masked", task_run_name="sum-masked-round-{round_number}", cache_policy=NO_CACHE)
def sum_masked_round(
    config: FederationConfig,
    round_number: int,
    clients: list[str],
    failed: dict[str, str],
    late: list[str],
    weight_scale: float,
    session_id: str,
    expected: dict[str, Expected],
) -> tuple[MaskedSum, AggregationReport]:
    ring = keyring(config)
    store = checkpoint_store(config, ring)
    previous = store.manifest(round_number - 1)
    global_adapter, _ = store.adapter_of(previous)
    parent = previous.adapter_sha256
    keys = {client: aggregator_update_key(ring, client) for client in clients}
    options = storage_options(config, clients)
    masked, report = sum_masked_updates(
        config, round_number, global_adapter, clients, failed, keys, weight_scale, session_id, parent, expected, options, late
    )
    logger = get_run_logger()
    for client, why in report.rejected.items():
        logger.warning("round %d: %s left out of the secure sum (%s): %s", round_number, client, why["reason"], why["detail"])
    return masked, report


@task(name="unmask", task_run_name="unmask-round-{round_number}", cache_policy=NO_CACHE)
def unmask_round(
    config: FederationConfig,
    round_number: int,
    session_id: str,
    masked: MaskedSum,
    mask_publics: dict[str, str],
    survivors: list[str],
    dropped: list[str],
    reveals: dict[str, str],
) -> tuple[Tensors, Tensors]:
    """The next adapter and the strategy's state for the next round."""
    ring = keyring(config)
    store = checkpoint_store(config, ring)
    previous = store.manifest(round_number - 1)
    global_adapter, _ = store.adapter_of(previous)
    strategy = build_strategy(config, round_number, store.strategy_state_of(previous), secure_sum=True)
    keys = {client: aggregator_update_key(ring, client) for client in reveals}
    session = secagg_session(config, round_number, session_id)
    adapter = finish_secure_round(config, global_adapter, masked, session, mask_publics, survivors, dropped, reveals, keys, strategy)
    get_run_logger().info("round %d: secure sum of %s unmasked (%d dropped after setup)", round_number, survivors, len(dropped))
    return adapter, strategy.state_dict()
