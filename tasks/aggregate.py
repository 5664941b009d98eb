"""The aggregator's stages: combine updates, commit the result, score it."""

from __future__ import annotations

import math
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from fedlib.config import FederationConfig
from fedlib.model.threads import intra_op_threads, thread_share
from fedlib.progress import BaseScored, RoundDone, emit
from fedlib.round.aggregator import build_strategy
from fedlib.round.broadcast import NextGlobal
from fedlib.round.manifest import Manifest, RoundScore
from fedlib.update.chain import Expected
from fedlib.update.intake import AggregationReport
from fedlib.wire.keys import AGGREGATOR
from tasks.aggregator_state import aggregator_state
from tasks.credentials import party_keys
from tasks.from_config import (
    Tensors,
    aggregate,
    checkpoint_store,
    evaluate_adapter,
    evaluation_examples,
    initial_adapter,
    round_global,
)


@task(name="aggregate", task_run_name="aggregate-round-{round_number}", cache_policy=NO_CACHE)
def aggregate_round(
    config: FederationConfig,
    round_number: int,
    clients: list[str],
    failed: dict[str, str],
    late: list[str],
    expected: dict[str, Expected],
) -> tuple[NextGlobal, AggregationReport]:
    """What to commit (the next adapter, the state for the next round, the broadcast), and the report."""
    state = aggregator_state(config, round_number)
    strategy = build_strategy(config.aggregation, config.privacy, round_number, state.own_state)
    intake = state.intake(config, clients, failed, late, expected)
    adapter, report = aggregate(config, intake, state.global_adapter, strategy)
    logger = get_run_logger()
    for client, why in report.rejected.items():
        logger.warning("round %d: update from %s rejected (%s): %s", round_number, client, why.reason, why.detail)
    logger.info("round %d: aggregated %s", round_number, report.accepted)
    return round_global(config, round_number, state.global_adapter, adapter, strategy.state_dict(), state.residual), report


@task(name="score", task_run_name="score-round-{manifest.round}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def score_round(config: FederationConfig, manifest: Manifest, beside: int = 0) -> Manifest:
    """The committed round's held-out score, signed as its own record beside the manifest
    (`RoundScore`); returns the manifest with it. Round 0's is the base model's. It runs beside
    the next round's training, so it takes its share of the cores with the `beside` clients
    training in this process meanwhile (all of them when nothing runs beside it)."""
    round_number = manifest.round
    store = checkpoint_store(config, party_keys(config, AGGREGATOR))
    adapter = store.adapter_of(manifest)[0] if round_number > 0 else None  # the committed adapter, checked against its digest
    started = time.perf_counter()
    with intra_op_threads(thread_share(1 + beside, config.training.torch_threads)):
        loss = evaluate_adapter(config, adapter, evaluation_examples(config))
    score = RoundScore(config.federation.id, round_number, manifest.adapter_sha256, loss, time.perf_counter() - started)
    store.commit_score(score)
    scored = manifest.with_score(score)
    get_run_logger().info("round %d: held-out loss %.4f", round_number, loss)
    emit(BaseScored(math.exp(loss)) if round_number == 0 else RoundDone(round_number, math.exp(loss)))
    return scored


@task(name="initial-adapter", task_run_name="initial-adapter-round-0", cache_policy=NO_CACHE)
def make_initial_adapter(config: FederationConfig) -> Tensors:
    return initial_adapter(config)


@task(
    name="checkpoint",
    task_run_name="checkpoint-round-{manifest.round}",
    cache_policy=NO_CACHE,
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8, 16 s: a store's outage of half a minute
)
def commit_round(config: FederationConfig, round_global: NextGlobal, manifest: Manifest) -> Manifest:
    """The round's commit, retried: the round's work is done and only the store stands between it
    and the lineage. A retry after a manifest that did land is recognised as the same commit."""
    store = checkpoint_store(config, party_keys(config, AGGREGATOR))
    return store.commit(round_global.adapter, manifest, round_global.state, round_global.broadcast)
