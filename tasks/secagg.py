"""Secure aggregation's extra steps around a round: the clients' setup and reveal, and the
aggregator's masked sum and unmasking. The clients' steps run where the clients run and post
their answer to their own bucket (`fedlib.wire.outbox`), where the aggregator reads it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.model.base import trained_part
from fedlib.rejection import Reason, UpdateRejected
from fedlib.round.aggregator import build_strategy
from fedlib.round.broadcast import NextGlobal
from fedlib.round.secure_aggregator import MaskedSum, finish_secure_round, sum_masked_updates
from fedlib.secagg.messages import RevealRequest, SetupMessage, SetupRequest
from fedlib.secagg.protocol import Session, check_setup, make_reveal, make_setup, open_inbox, read_complaint, unmask_sum
from fedlib.secagg.quantised import Codes
from fedlib.update.chain import Expected
from fedlib.update.intake import AggregationReport
from fedlib.wire.decode import parse_json
from fedlib.wire.keys import AGGREGATOR
from tasks.aggregator_state import aggregator_state
from tasks.credentials import party_keys, storage_options
from tasks.from_config import (
    aggregator_update_key,
    client_data,
    client_update_key,
    outbox,
    reveal_ledger,
    round_global,
    secagg_session,
    weight_rule,
)


def _client_outbox(config: FederationConfig, client: str, round_number: int):
    ring = party_keys(config, client)
    return ring, outbox(config, client, round_number, client_update_key(ring, client), storage_options(config, [client])[client])


@task(name="secagg-setup", task_run_name="secagg-setup-{client}-round-{round_number}", cache_policy=NO_CACHE)
def secagg_setup(config: FederationConfig, client: str, round_number: int, request: SetupRequest) -> str:
    """Posts this client's setup message (with its example count) for the aggregator to relay;
    returns where."""
    ring, box = _client_outbox(config, client, round_number)
    examples = len(client_data(config, client, box.key, box.options).train)
    message = replace(make_setup(ring, client, secagg_session(config, round_number, request.session_id)), num_examples=examples)
    return box.post("setup", request.session_id, json.dumps(message.to_json()).encode())


@task(name="secagg-reveal", task_run_name="secagg-reveal-{client}-round-{round_number}", cache_policy=NO_CACHE)
def secagg_reveal(config: FederationConfig, client: str, round_number: int, request: RevealRequest) -> str:
    """Answers once per session (see `fedlib.wire.sealed_stores.RevealLedger`); posts the answer."""
    ring, box = _client_outbox(config, client, round_number)
    session = secagg_session(config, round_number, request.session_id)
    peers = open_inbox(ring, client, session, request.inbox)
    ledger = reveal_ledger(config, ring, client)
    reveal = make_reveal(ring, client, session, peers, request.survivors, request.dropped, client_update_key(ring, client), ledger)
    return box.post("reveal", request.session_id, reveal.encode())


@dataclass(frozen=True)
class Posted:
    """The messages of one kind the aggregator read: each client's authenticated body and the
    bytes read for it, and why the others were not read."""

    bodies: dict[str, bytes]
    sizes: dict[str, int]
    failed: dict[str, str]


@task(name="read-client-messages", task_run_name="read-{kind}-round-{round_number}", cache_policy=NO_CACHE)
def read_client_messages(config: FederationConfig, round_number: int, kind: str, session_id: str, clients: Iterable[str]) -> Posted:
    ring = party_keys(config, AGGREGATOR)
    clients = list(clients)
    options = storage_options(config, clients)
    posted = Posted({}, {}, {})
    for client in clients:
        box = outbox(config, client, round_number, aggregator_update_key(ring, client), options[client])
        try:
            posted.bodies[client], posted.sizes[client] = box.fetch(kind, session_id)
        except UpdateRejected as err:
            posted.failed[client] = f"{kind} message {err.reason.value}: {err.detail}"
            get_run_logger().warning("round %d: %s's %s message refused: %s", round_number, client, kind, posted.failed[client])
    return posted


def junk_setups(session: Session, setups: dict[str, SetupMessage]) -> dict[str, str]:
    """The senders whose setup envelopes are visibly wrong (`check_setup`), with why."""
    junk = {}
    for sender, setup in setups.items():
        try:
            check_setup(session, sender, setup, setups)
        except UpdateRejected as err:
            junk[sender] = f"setup message {err.reason.value}: {err.detail}"
            get_run_logger().warning("round %d: %s's setup refused at the relay: %s", session.round, sender, junk[sender])
    return junk


@task(name="read-complaints", task_run_name="read-complaints-round-{round_number}", cache_policy=NO_CACHE)
def read_complaints(config: FederationConfig, round_number: int, session: Session, clients: list[str]) -> dict[str, str]:
    """The senders named in the authenticated complaints of clients whose training failed: each
    accused sender, with who could not open its setup message and why. A client that failed
    for another reason posted none."""
    if not clients:
        return {}
    ring = party_keys(config, AGGREGATOR)
    options = storage_options(config, clients)
    accused: dict[str, str] = {}
    for author in clients:
        box = outbox(config, author, round_number, aggregator_update_key(ring, author), options[author])
        try:
            complaint = read_complaint(box.fetch("complaint", session.id)[0], session, author)
        except UpdateRejected as err:
            if err.reason is not Reason.MISSING:
                get_run_logger().warning("round %d: %s's complaint refused: %s", round_number, author, err.detail)
            continue
        for sender, why in complaint.items():
            accused[sender] = f"{author} could not open its setup message ({why})"
    return accused


def parse_setups(bodies: dict[str, bytes]) -> tuple[dict[str, SetupMessage], dict[str, str]]:
    setups, failed = {}, {}
    for client, body in bodies.items():
        try:
            setups[client] = SetupMessage.from_json(parse_json(body, f"{client}'s setup", 1 << 20, max_depth=3))
        except UpdateRejected as err:
            failed[client] = f"setup message {err.reason.value}: {err.detail}"
    return setups, failed


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
    codes: Codes | None = None,
) -> tuple[MaskedSum, AggregationReport]:
    state = aggregator_state(config, round_number)
    intake = state.intake(config, clients, failed, late, expected, session_id)
    template = trained_part(config.lora, state.global_adapter)
    masked, report = sum_masked_updates(intake, template, weight_rule(config), weight_scale, config.secagg_min_survivors, codes)
    logger = get_run_logger()
    for client, why in report.rejected.items():
        logger.warning("round %d: %s left out of the secure sum (%s): %s", round_number, client, why.reason, why.detail)
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
) -> NextGlobal:
    """What to commit: the next adapter, the state for the next round, the broadcast."""
    state = aggregator_state(config, round_number)
    strategy = build_strategy(config.aggregation, config.privacy, round_number, state.own_state, secure_sum=True)
    keys = {client: aggregator_update_key(state.ring, client) for client in reveals}
    session = secagg_session(config, round_number, session_id)
    unmasked = unmask_sum(masked.residues, session, mask_publics, survivors, dropped, reveals, keys)
    template = trained_part(config.lora, state.global_adapter)
    frac_bits = config.secure_aggregation.frac_bits
    adapter = finish_secure_round(masked, unmasked, state.global_adapter, template, weight_rule(config), frac_bits, strategy, round_number)
    get_run_logger().info("round %d: secure sum of %s unmasked (%d dropped after setup)", round_number, survivors, len(dropped))
    return round_global(config, round_number, state.global_adapter, adapter, strategy.state_dict(), state.residual)
