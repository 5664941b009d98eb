"""Prefect artifacts: what the Prefect UI shows beside the runs. A table per round (every
sampled client, accepted or left out) and a markdown summary of the federation."""

from __future__ import annotations

import re

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.rejection import Rejection
from fedlib.reports.tables import round_rows, summary_markdown
from fedlib.round.manifest import Manifest
from fedlib.update.report import ClientReport
from tasks.registry import champion_version


def _key(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def round_table_key(federation: str, round_number: int) -> str:
    return _key(f"{federation}-round-{round_number}")


def summary_key(federation: str) -> str:
    return _key(f"{federation}-summary")


@task(
    name="publish-round-table",
    task_run_name="publish-round-table-round-{round_number}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
)
def publish_round_table(
    config: FederationConfig, round_number: int, sampled: list[str], reports: dict[str, ClientReport], rejected: dict[str, Rejection]
) -> None:
    rows = round_rows(sampled, reports, rejected)
    create_table_artifact(
        table=rows,
        key=round_table_key(config.federation.id, round_number),
        description=f"Round {round_number} of federation `{config.federation.id}`: one row per sampled client.",
    )


def mlflow_run_url(config: FederationConfig, run_id: str) -> str:
    experiment_id = MlflowClient(tracking_uri=config.tracking_uri).get_run(run_id).info.experiment_id
    return f"{config.tracking.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@task(name="publish-summary", task_run_name="publish-summary", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def publish_summary(config: FederationConfig, run_id: str, manifests: list[Manifest]) -> None:
    champion = champion_version(config)
    markdown = summary_markdown(config.federation.id, manifests, mlflow_run_url(config, run_id), config.registered_model_name, champion)
    create_markdown_artifact(markdown=markdown, key=summary_key(config.federation.id), description=f"Federation `{config.federation.id}`")
