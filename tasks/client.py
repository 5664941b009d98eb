"""A client's round: runs where the client's data lives, writes only to the client's bucket."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.federation import ClientReport, checkpoint_store, federation_key, load_data, train_client_update


@task(
    name="train-client",
    task_run_name="train-{client}-round-{round_number}",
    retries=2,
    retry_delay_seconds=[1, 4],
    cache_policy=NO_CACHE,
)
def train_client(config: FederationConfig, client: str, round_number: int, blocks: list[int]) -> ClientReport:
    global_adapter = checkpoint_store(config).adapter(round_number - 1)
    shard = load_data(config).train.select(blocks)
    return train_client_update(config, client, round_number, global_adapter, shard, federation_key(config))
