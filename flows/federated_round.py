"""One round's DAG: partition (cached) → train on every cloud at once (as tasks here, or as each
cloud's `client-training` deployment on its own work pool) → aggregate → checkpoint. The
federation scores the committed adapter beside the next round (`tasks.aggregate.score_round`).
With secure aggregation the clients exchange mask-key shares before training and reveal shares
after it, so that the aggregator only ever sees the sum."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from fedlib.config import FederationConfig
from fedlib.privacy.accountant import participation_after, privacy_spent
from fedlib.progress import RoundStarted, emit
from fedlib.rejection import QuorumNotMet, Reason
from fedlib.round.broadcast import NextGlobal
from fedlib.round.cost import round_cost
from fedlib.round.manifest import Manifest, RoundPlan, measured_reports, round_manifest
from fedlib.round.outcome import MessageBytes, PhaseTimings, RoundOutcome, SecureFacts
from fedlib.round.planning import sample_clients, step_budgets
from fedlib.secagg.messages import RevealRequest, SetupRequest, TrainRequest, relayed_bytes
from fedlib.secagg.protocol import relay_setups
from fedlib.strategies.shares import capped_weights
from fedlib.update.chain import Expected
from fedlib.wire.keys import AGGREGATOR
from flows.client_steps import ClientSteps
from tasks.aggregate import aggregate_round, commit_round
from tasks.artifacts import publish_round_table
from tasks.credentials import party_keys
from tasks.data import partition_data
from tasks.from_config import checkpoint_store, expected_of, round_codes, secagg_session, weight_rule
from tasks.secagg import junk_setups, parse_setups, read_client_messages, read_complaints, sum_masked_round, unmask_round


@dataclass(frozen=True)
class RoundResult:
    """What either kind of round hands on: the global to commit and what the aggregation came to."""

    next_global: NextGlobal
    outcome: RoundOutcome


def plain_round(steps: ClientSteps, clients: list[str], expected: dict[str, Expected]) -> RoundResult:
    """train → aggregate: every update in the clear to the aggregator, combined by the strategy."""
    config, round_number = steps.config, steps.round_number
    started = time.perf_counter()
    training = steps.run("train", clients, deadline_s=config.orchestration.round_deadline_s)
    phases = PhaseTimings(clients_wall_s=time.perf_counter() - started)
    next_global, report = aggregate_round(config, round_number, clients, training.failed, training.late, expected)
    return RoundResult(next_global, RoundOutcome(report, dict(training.elapsed), phases))


def secure_round(
    steps: ClientSteps, clients: list[str], expected: dict[str, Expected], bad_setups: dict[str, str] | None = None
) -> RoundResult:
    """setup → train and mask → masked sum → reveal → unmask. A client that fails its setup is
    left out of everyone's masks; one that fails after it is unmasked from the survivors' reveals.
    A fresh session per attempt: an upload left from an earlier attempt is refused by name.

    A setup message that is junk is its sender's (it reached the aggregator sealed under the
    sender's key): named at the relay where its envelopes are visibly wrong, or by the peers that
    cannot open it, who mask nothing and post an authenticated complaint. Either way the sender is
    rejected (`bad_setup`, in `bad_setups`) and the round runs again without it, in a new session."""
    config, round_number = steps.config, steps.round_number
    bad_setups = dict(bad_setups or {})
    session_id = secrets.token_hex(8)
    session = secagg_session(config, round_number, session_id)
    started = time.perf_counter()
    setup_request = SetupRequest(session_id)
    setup = steps.run("setup", clients, lambda _: setup_request)
    posted_setups = read_client_messages(config, round_number, "setup", session_id, setup.done)
    setups, unparsed = parse_setups(posted_setups.bodies)
    for sender, why in junk_setups(session, setups).items():
        bad_setups[sender] = why
        del setups[sender]
    failed = {**setup.failed, **{c: "secagg setup not done in time" for c in setup.late}, **posted_setups.failed, **unparsed}
    if len(setups) < config.secagg_min_survivors:
        raise QuorumNotMet(
            f"round {round_number}: {len(setups)} clients completed the secure-aggregation setup, "
            f"{config.secagg_min_survivors} needed ({failed})"
        )
    inboxes = relay_setups(setups)
    # Every participant's weight over their sum: the unmasked sum is the mean if nobody drops.
    # Each client said its count in its setup; a count past the round's cap is refused later,
    # when its masked update's weight must match it.
    # No client's weight past `aggregation.max_weight_share`: each is told its capped count, and
    # its masked update is held to it.
    counts = capped_weights(
        {c: min(s.num_examples, expected[c].max_examples) for c, s in setups.items()},
        config.aggregation.max_weight_share,
        {c for c in setups if expected[c].count_known},
    )
    expected = {**expected, **{c: replace(expected[c], max_examples=n) for c, n in counts.items()}}
    weights, scale = weight_rule(config).announced(counts)
    codes = round_codes(
        config, len(setups), max(weights.values()) / scale, max(steps.local_steps.get(c, config.training.local_steps) for c in setups)
    )
    setup_s = time.perf_counter() - started
    train_requests = {c: TrainRequest(session_id, inboxes[c], scale, codes.scale if codes else 0.0, counts[c]) for c in setups}
    training = steps.run("train", sorted(setups), train_requests.__getitem__, config.orchestration.round_deadline_s)
    trained = time.perf_counter()
    accused = read_complaints(config, round_number, session, list(training.failed))
    if accused:
        get_run_logger().warning(
            "round %d: setup messages that peers could not open, from %s; again without them", round_number, sorted(accused)
        )
        remaining = [c for c in clients if c not in accused]
        return secure_round(steps, remaining, expected, {**bad_setups, **accused})
    all_failed = {**failed, **training.failed}
    masked, report = sum_masked_round(
        config, round_number, [c for c in clients if c not in bad_setups], all_failed, training.late, scale, session_id, expected, codes
    )
    for sender, why in bad_setups.items():
        report.reject(sender, Reason.BAD_SETUP, why)
    survivors = list(report.accepted)
    dropped = [c for c in sorted(setups) if c not in survivors]
    reveal_started = time.perf_counter()
    reveal_requests = {c: RevealRequest(session_id, inboxes[c], tuple(survivors), tuple(dropped)) for c in survivors}
    revealed = steps.run("reveal", survivors, reveal_requests.__getitem__)
    posted_reveals = read_client_messages(config, round_number, "reveal", session_id, revealed.done)
    reveals = {c: body.decode("ascii", "replace") for c, body in posted_reveals.bodies.items()}
    publics = {c: s.mask_public for c, s in setups.items()}
    committed = unmask_round(config, round_number, session_id, masked, publics, survivors, dropped, reveals)
    facts = SecureFacts(
        session=session_id,
        threshold=config.secagg_threshold,
        setup_failed=sorted(failed),
        dropped_after_setup=dropped,
        revealed_by=sorted(reveals),
        reveal_failed={**revealed.failed, **{c: "not done" for c in revealed.late}, **posted_reveals.failed},
    )
    phases = PhaseTimings(
        clients_wall_s=trained - started - setup_s, secagg_setup_s=setup_s, secagg_reveal_unmask_s=time.perf_counter() - reveal_started
    )
    protocol_bytes = {
        c: MessageBytes(
            up=posted_setups.sizes.get(c, 0) + posted_reveals.sizes.get(c, 0),
            down=sum(relayed_bytes(r) for r in (setup_request, train_requests.get(c), reveal_requests.get(c)) if r is not None),
        )
        for c in clients
    }
    return RoundResult(committed, RoundOutcome(report, dict(training.elapsed), phases, protocol_bytes, facts))


@flow(name="federated-round", flow_run_name="round-{round_number}", task_runner=ThreadPoolTaskRunner(max_workers=8))
def federated_round(
    config: FederationConfig,
    round_number: int,
    run_id: str,
    target_round: int,
    misconfigured: dict[str, str] | None = None,
) -> Manifest:
    """Returns the committed manifest, not yet scored. A client that fails after its retries is left out (and
    recorded); the round fails only if fewer than `aggregation.min_clients` updates survive.
    A `misconfigured` client (its preflight failed: why) is not dispatched, and is recorded."""
    started = time.perf_counter()
    assignment = partition_data(config) if config.simulated else {}  # cached: once per lineage
    partitioned = time.perf_counter()
    store = checkpoint_store(config, party_keys(config, AGGREGATOR))  # verified with the key the aggregator trusts
    previous = store.manifest_read(round_number - 1)[0]
    sampled = sample_clients([c.name for c in config.clouds], config.federation.clients_per_round, config.federation.seed, round_number)
    left_out = {c: why for c, why in (misconfigured or {}).items() if c in sampled}
    clients = [c for c in sampled if c not in left_out]
    budgets = step_budgets(config.training, config.profiles, config.orchestration.round_deadline_s, clients, previous)
    steps = ClientSteps(config, round_number, budgets)
    emit(RoundStarted(round_number, tuple(clients), budgets))
    expected = expected_of(config, {c: len(assignment[c]) for c in clients if c in assignment}, budgets)
    round_of = secure_round if config.secure_aggregation.enabled else plain_round
    result = round_of(steps, clients, expected)
    report = result.outcome.report
    for client, why in left_out.items():
        report.reject(client, Reason.MISCONFIGURED, why)
    reports = report.reports
    aggregated = time.perf_counter()
    timings = {
        "partition_s": partitioned - started,
        "train_s": max((r.train_s for r in reports.values()), default=0.0),
        "encrypt_upload_s": max((r.encrypt_upload_s for r in reports.values()), default=0.0),
        **result.outcome.phases.as_dict(),
        "download_decrypt_s": report.download_decrypt_s,
        "aggregate_s": report.aggregate_s,
        "round_s": aggregated - started,
    }
    participation = participation_after(previous.privacy.participation if previous.privacy else {}, clients)
    a = config.aggregation
    recipe = (a.strategy, a.model_dump(mode="json"), list(config.compression.codecs))
    plan = RoundPlan(config.federation.id, round_number, target_round, list(sampled), dict(budgets), *recipe)
    privacy = privacy_spent(config.privacy, participation)
    held = measured_reports(result.outcome, previous)
    cost = round_cost(config.profiles, config.orchestration.round_deadline_s, held, report.stragglers)
    manifest = round_manifest(previous, plan, result.outcome, cost, timings, (run_id, str(flow_run.id)), privacy)
    committed = commit_round(config, result.next_global, manifest)
    publish_round_table(config, round_number, sampled, reports, dict(report.rejected))
    return committed
