"""The federation: round 0 (base model and initial adapter), then rounds until the target.

Re-running continues the lineage: an interrupted run is finished (same target round), a
finished one is extended by `training.rounds` more rounds. State lives in the checkpoint store,
so any process can pick it up.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from fedlib.config import ConfigError, FederationConfig, config_from
from fedlib.model.base import base_revision
from fedlib.privacy.accountant import over_budget
from fedlib.progress import PlanMade, Stopped, emit
from fedlib.round.broadcast import NextGlobal
from fedlib.round.checkpoint import plan_rounds
from fedlib.round.manifest import Manifest, base_manifest
from fedlib.round.planning import budget_stop
from fedlib.round.preflight import PartiesMisconfigured, PreflightRequest
from fedlib.wire.keys import AGGREGATOR
from flows.client_steps import ClientSteps
from flows.federated_round import federated_round
from flows.progress_logs import progress_in_run_logs
from tasks.aggregate import commit_round, make_initial_adapter, score_round
from tasks.artifacts import publish_summary
from tasks.credentials import party_keys
from tasks.data import distribute_data, partition_data
from tasks.from_config import checkpoint_store, keyring
from tasks.orphans import close_orphaned_rounds
from tasks.preflight import preflight_aggregator
from tasks.registry import register_round, registered_rounds
from tasks.tracking import finish_tracking, open_tracking, track_final_adapter, track_round, tracked_rounds


def _run_name() -> str:
    """`federation-<id>`, the name people look for in the Prefect UI."""
    try:
        return f"federation-{config_from(flow_run.parameters.get('config', '')).federation.id}"
    except ConfigError:
        return "federation"


@flow(name="federated-training", flow_run_name=_run_name, log_prints=True)
def federated_training(config: dict[str, Any] | str, dispatch: Literal["local", "deployments"] | None = None) -> list[Manifest]:
    """`config` is the federation's config as data (a mapping, validated here) or the path or
    fsspec URL of its YAML file. Runs the planned rounds; returns every committed manifest of the
    lineage (round 0 first). `dispatch` overrides the config's `orchestration.dispatch`, so one
    config runs locally or on the clouds' work pools."""
    settings = config_from(config)
    if dispatch is not None:
        settings = settings.model_copy(update={"orchestration": settings.orchestration.model_copy(update={"dispatch": dispatch})})
    with progress_in_run_logs():
        return run_federation(settings, config if isinstance(config, str) else None)


def preflight(config: FederationConfig, first_round: int, new_lineage: bool) -> dict[str, str]:
    """Before any training, every party opens what it will open (`tasks.preflight`): the
    aggregator here, each client where it runs; a new lineage also writes a probe to each
    bucket (later runs leave a store that is down to the round, which retries and goes on).
    The aggregator's failure stops the run; a client's leaves it out of every round (recorded
    as `misconfigured`, and `fedlib run` exits non-zero naming it), unless too few are left."""
    preflight_aggregator(config, new_lineage)
    request = PreflightRequest(probe_stores=new_lineage)
    checked = ClientSteps(config, first_round, {}).run("preflight", [c.name for c in config.clouds], lambda _: request)
    problems = {**checked.failed, **{c: "its preflight did not finish in time" for c in checked.late}}
    if len(config.clouds) - len(problems) < config.aggregation.min_clients:
        raise PartiesMisconfigured(problems)
    for client, why in problems.items():
        get_run_logger().warning("%s is left out of this run: %s", client, why)
    return problems


def catch_up(config: FederationConfig, run_id: str, manifests: list[Manifest]) -> None:
    """What a crash left undone for committed rounds, in order: scores, then MLflow, then the
    registry (a resumed run's own rounds are recorded as they commit)."""
    store = checkpoint_store(config, party_keys(config, AGGREGATOR))
    for i, missed in enumerate(manifests):
        if missed.eval_loss is None:
            manifests[i] = score_round(config, missed)
    tracked = tracked_rounds(config, run_id)
    for i, missed in enumerate(manifests):
        if missed.round not in tracked:
            track_round(config, run_id, missed.round, manifests[: i + 1], now_ms())
    registered = registered_rounds(config)
    for missed in [m for m in manifests[1:] if m.round not in registered]:
        register_round(config, run_id, missed, store.adapter_of(missed)[0])


def now_ms() -> int:
    return int(time.time() * 1000)


class RoundRecords:
    """Each committed round's score, tracking and registry, as task futures that run beside the
    next round's training, one round after another. The scorer takes its share of the cores with
    the `beside` clients training in this process meanwhile (none beside the last round)."""

    def __init__(self, config: FederationConfig, run_id: str, scored: list[Manifest], beside: int):
        self.config, self.run_id, self.beside = config, run_id, beside
        self.lineage: list[Manifest | PrefectFuture] = list(scored)  # each round's scored manifest, or the future of it
        self.futures: list[PrefectFuture] = []

    def submit(self, manifest: Manifest, last: bool) -> None:
        config, run_id = self.config, self.run_id
        score = score_round.submit(config, manifest, 0 if last else self.beside)
        self.lineage.append(score)
        tracked = track_round.submit(config, run_id, manifest.round, list(self.lineage), now_ms(), wait_for=self.futures[-1:])
        self.futures += [score, tracked]
        if manifest.round > 0:
            adapter = checkpoint_store(config, party_keys(config, AGGREGATOR)).adapter_of(manifest)[0]
            self.futures.append(register_round.submit(config, run_id, score, adapter, wait_for=[tracked]))

    def raise_failed(self) -> None:
        """The first record that has failed, as itself: the run stops before its next round."""
        for future in self.futures:
            if future.state.is_final() and not future.state.is_completed():
                future.result()

    def scored(self) -> list[Manifest]:
        """The lineage with every score, once every record is done; the first failure, as itself."""
        for future in self.futures:
            future.result()
        return [m.result() if isinstance(m, PrefectFuture) else m for m in self.lineage]

    def wait(self) -> None:
        wait(self.futures)


def run_federation(config: FederationConfig, config_path: str | None = None) -> list[Manifest]:
    logger = get_run_logger()
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    if config.keyring is None:
        keyring(config, create=True)  # embedded default: made once here, so concurrent clients never race to make keys
    store = checkpoint_store(config, party_keys(config, AGGREGATOR))
    manifests = store.manifests()  # the verified lineage, walked once
    plan = plan_rounds(manifests, config.training.rounds)
    logger.info("%s: rounds %d..%d%s", config_path or "<config>", plan.first, plan.last, " (resuming)" if plan.resumed else "")
    emit(PlanMade(plan.first, plan.last))
    misconfigured = preflight(config, plan.first, new_lineage=not manifests)

    started = time.perf_counter()
    if config.simulated:  # one corpus: split it, and send each client its shard
        distribute_data(config, partition_data(config))
    partition_s = time.perf_counter() - started

    run_id = open_tracking(config, manifests[-1].mlflow_run_id if manifests else None)
    if manifests:  # a crash came between a commit and its score, tracking or registry
        catch_up(config, run_id, manifests)
        close_orphaned_rounds(federated_round.name)  # and may have left its round open in Prefect

    status = "FAILED"
    # Each committed round is scored, tracked and registered beside the next round's training, in
    # order: what the next round needs is the committed checkpoint, not its score or MLflow. A
    # crash before they finish is caught up on resume; a failure fails the run once the round in
    # flight is committed.
    records = RoundRecords(config, run_id, manifests, beside=len(config.clouds) if config.orchestration.dispatch == "local" else 0)
    try:
        if not manifests:
            manifest = base_manifest(
                config.federation.id, plan.last, run_id, {"partition_s": partition_s}, base_revision(config.model.source)
            )
            manifests = [commit_round(config, NextGlobal(make_initial_adapter(config), {}), manifest)]
            records.submit(manifests[0], last=False)
        for round_number in range(plan.first, plan.last + 1):
            records.raise_failed()
            last = manifests[-1].privacy
            epsilon = over_budget(config.privacy, last.participation if last else {})
            stop = budget_stop(config.budget, manifests)
            if epsilon is not None:
                stop = f"privacy budget: round {round_number} would reach ε={epsilon:.3f} > {config.privacy.epsilon_budget}"
            if stop is not None:
                logger.warning("%s; stopping before round %d", stop, round_number)
                emit(Stopped(stop, round_number))
                break
            manifests.append(federated_round(config, round_number, run_id, plan.last, misconfigured))
            records.submit(manifests[-1], last=round_number == plan.last)
        manifests = records.scored()
        final = manifests[-1]
        track_final_adapter(config, run_id, store.adapter_of(final)[0], final.round)
        publish_summary(config, run_id, manifests)
        status = "FINISHED"
    finally:
        records.wait()  # the run's last words come after every round's
        finish_tracking(config, run_id, status)
    return manifests
