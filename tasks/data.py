"""The simulated mode's data step: partition the corpus (deterministic from the config, cached by
Prefect across runs) and distribute each client's shard, sealed for it, into its own bucket."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.data.partition import label_histogram
from fedlib.data.shards import distribute_shard
from fedlib.wire.keys import AGGREGATOR
from tasks.credentials import party_keys, storage_options
from tasks.from_config import aggregator_update_key, load_data, partition_clients, partition_digest, shard_place


def _partition_key(context, parameters) -> str:
    return "partition-" + partition_digest(parameters["config"])


@task(name="partition", task_run_name="partition", cache_key_fn=_partition_key, persist_result=True, result_serializer="json")
def partition_data(config: FederationConfig) -> dict[str, list[int]]:
    data = load_data(config)
    assignment = partition_clients(config, data)
    labels = data.train.labels(config.partition.by)
    logger = get_run_logger()
    for (client, blocks), histogram in zip(assignment.items(), label_histogram(labels, list(assignment.values())), strict=True):
        logger.info("client %s: %d blocks, labels %s", client, len(blocks), dict(sorted(histogram.items())))
    return assignment


@task(name="distribute-data", task_run_name="distribute-data", cache_policy=NO_CACHE)
def distribute_data(config: FederationConfig, assignment: dict[str, list[int]]) -> dict[str, str]:
    """Each client's blocks (and its validation split) into its own bucket; {client: url}."""
    data = load_data(config)
    ring = party_keys(config, AGGREGATOR)
    options = storage_options(config, list(assignment))
    urls, logger = {}, get_run_logger()
    for index, (client, blocks) in enumerate(assignment.items()):
        validation = data.validation(index, len(assignment), config.evaluation.client_blocks)
        key = aggregator_update_key(ring, client)
        try:
            urls[client] = distribute_shard(shard_place(config, client), data.train.select(blocks), validation, key, options[client])
        except Exception as err:  # noqa: BLE001 - that client's bucket is down: it fails its rounds, the others go on
            logger.warning("client %s: its shard could not be written (%s); it cannot train until it is", client, err)
            continue
        logger.info("client %s: shard of %d blocks (+%d validation) at %s", client, len(blocks), len(validation), urls[client])
    return urls
