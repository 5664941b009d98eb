"""One round's DAG: partition (cached) → train on every cloud at once (as tasks here, or as each
cloud's `client-training` deployment on its own work pool) → aggregate → evaluate → checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from fedlib.config import FederationConfig
from fedlib.client import ClientReport
from fedlib.federation import checkpoint_store, progress
from fedlib.privacy.accountant import privacy_spent
from tasks.aggregate import aggregate_round, commit_round, evaluate_global
from tasks.client import submit_client_round
from tasks.data import partition_data
from tasks.dispatch import dispatch_client


@flow(name="federated-round", flow_run_name="round-{round_number}", task_runner=ThreadPoolTaskRunner(max_workers=8))
def federated_round(
    config: FederationConfig,
    round_number: int,
    run_id: str,
    target_round: int,
    config_path: str | None = None,
) -> dict[str, Any]:
    """Returns the committed manifest. A client that fails after its retries is left out (and
    recorded); the round fails only if fewer than `aggregation.min_clients` updates survive."""
    logger = get_run_logger()
    started = time.perf_counter()
    progress.info("round %d started", round_number)
    assignment = partition_data(config)  # cached: computed once per lineage, read back after
    partitioned = time.perf_counter()
    if config.orchestration.dispatch == "deployments":
        if config_path is None:
            raise ValueError("orchestration.dispatch=deployments needs the config file's path for the client runs")
        futures = {c.name: dispatch_client.submit(config, config_path, c.name, round_number) for c in config.clouds}
    else:
        futures = {c.name: submit_client_round(config, c.name, round_number, assignment[c.name]) for c in config.clouds}
    reports: dict[str, ClientReport] = {}
    failed: dict[str, str] = {}
    for client, future in futures.items():
        try:
            reports[client] = future.result()
        except Exception as err:  # noqa: BLE001 - a client's failure is data for the round, not a crash
            failed[client] = f"{type(err).__name__}: {err}"
            logger.warning("round %d: client %s failed: %s", round_number, client, failed[client])
    trained = time.perf_counter()

    adapter, report = aggregate_round(config, round_number, list(futures), failed)
    eval_started = time.perf_counter()
    eval_loss = evaluate_global(config, round_number, adapter)
    evaluated = time.perf_counter()
    manifest = {
        "federation": config.federation.id,
        "target_round": target_round,
        "mlflow_run_id": run_id,
        "strategy": config.aggregation.strategy,
        "parent_adapter_sha256": checkpoint_store(config).manifest(round_number - 1)["adapter_sha256"],
        "clients": {c: asdict(r) for c, r in reports.items() if c in report.accepted},
        "accepted": report.accepted,
        "rejected": report.rejected,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss),
        **privacy_spent(config.privacy, round_number),
        "timings": {
            "partition_s": partitioned - started,
            "train_s": max((r.train_s for r in reports.values()), default=0.0),
            "encrypt_upload_s": max((r.encrypt_upload_s for r in reports.values()), default=0.0),
            "clients_wall_s": trained - partitioned,
            "download_decrypt_s": report.download_decrypt_s,
            "aggregate_s": report.aggregate_s,
            "evaluate_s": evaluated - eval_started,
            "round_s": evaluated - started,
        },
    }
    committed = commit_round(config, round_number, adapter, manifest)
    progress.info("round %d done: perplexity %.2f", round_number, committed["perplexity"])
    return committed
