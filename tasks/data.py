"""Partitioning: deterministic from the config, and cached by Prefect across runs."""

from __future__ import annotations

import hashlib
import json

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.federation import load_data, partition_clients
from fedlib.partition import label_histogram


def _partition_key(context, parameters) -> str:
    """Only what decides the split: the data, the held-out set, the split rule, the seed and the clients."""
    c: FederationConfig = parameters["config"]
    fields = {
        "model": c.model.source,
        "data": c.data.model_dump(mode="json"),
        "evaluation": c.evaluation.model_dump(mode="json"),
        "partition": c.partition.model_dump(mode="json"),
        "seed": c.federation.seed,
        "clouds": [cloud.name for cloud in c.clouds],
    }
    return "partition-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@task(name="partition", task_run_name="partition", cache_key_fn=_partition_key, persist_result=True, result_serializer="json")
def partition_data(config: FederationConfig) -> dict[str, list[int]]:
    data = load_data(config)
    assignment = partition_clients(config, data)
    labels = data.train.labels(config.partition.by)
    logger = get_run_logger()
    for (client, blocks), histogram in zip(assignment.items(), label_histogram(labels, list(assignment.values()))):
        logger.info("client %s: %d blocks, labels %s", client, len(blocks), dict(sorted(histogram.items())))
    return assignment


@task(name="prepare-data", task_run_name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(config: FederationConfig) -> int:
    """Tokenise once (cached on disk) before clients start, so they do not race to do it."""
    return len(load_data(config).train)
