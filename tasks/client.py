"""A client's round: runs where the client's data lives, writes only to the client's bucket.

Training and upload are separate tasks so that a storage fault retries the upload with backoff,
not the training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.tasks import exponential_backoff

from fedlib.config import FederationConfig
from fedlib.client import SealedUpdate, train_and_seal, upload_sealed
from fedlib.manifest import ClientReport
from fedlib.client_state import CarriedResidual, ResidualStore
from fedlib.federation import checkpoint_store, client_update_key, keyring, load_data, residual_store, secagg_session
from fedlib.secagg.client import SecureRound
from fedlib.secagg.messages import TrainRequest
from tasks.storage import storage_options


@task(name="train-client", task_run_name="train-{client}-round-{round_number}", cache_policy=NO_CACHE)
def train_client(
    config: FederationConfig,
    client: str,
    round_number: int,
    blocks: list[int],
    secure: TrainRequest | None = None,
    local_steps: int | None = None,
) -> SealedUpdate:
    """With `secure` (the secure-aggregation session, the peers' relayed setup messages, and
    the weight scale), the update is masked."""
    ring = keyring(config)
    store = checkpoint_store(config, ring)
    previous = store.manifest(round_number - 1)  # signature, federation and round checked
    global_adapter, downloaded = store.adapter_of(previous)
    parent = previous.adapter_sha256
    shard = load_data(config).train.select(blocks)
    masking = None
    if secure:
        session = secagg_session(config, round_number, secure.session_id)
        masking = SecureRound(ring, session, secure.inbox, secure.weight_scale)
    residuals = None
    if config.compression.error_feedback and config.compression.chain.lossy:
        residuals = CarriedResidual(_residuals(config, client), store.last_accepted_round(client, round_number))
    key = client_update_key(ring, client)
    sealed = train_and_seal(config, client, round_number, global_adapter, shard, key, masking, residuals, local_steps, parent)
    return replace(sealed, report=replace(sealed.report, bytes_downloaded=downloaded))


def _residuals(config: FederationConfig, client: str) -> ResidualStore:
    return residual_store(config, keyring(config), client, storage_options(config, [client])[client])


@task(
    name="upload-update",
    task_run_name="upload-{sealed.report.client}-round-{sealed.report.round}",
    cache_policy=NO_CACHE,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
)
def upload_update(config: FederationConfig, sealed: SealedUpdate) -> ClientReport:
    client = sealed.report.client
    options = storage_options(config, [client])[client]
    return upload_sealed(sealed, options, _residuals(config, client) if sealed.residual_blob else None)


@dataclass(frozen=True)
class ClientRound:
    """The two futures of one client's round."""

    trained: PrefectFuture
    uploaded: PrefectFuture

    def result(self, timeout: float | None = None) -> ClientReport:
        """The upload's report, or the error of the stage that failed first (an upload that never
        started because training failed would only say that it is unfinished). `timeout` covers
        both stages."""
        started = time.monotonic()
        self.trained.result(timeout=timeout)
        left = None if timeout is None else max(0.01, timeout - (time.monotonic() - started))
        return self.uploaded.result(timeout=left)


def submit_client_round(
    config: FederationConfig,
    client: str,
    round_number: int,
    blocks: list[int],
    secure: TrainRequest | None = None,
    local_steps: int | None = None,
) -> ClientRound:
    """train → upload, as two tasks that run concurrently with other clients'."""
    trained = train_client.submit(config, client, round_number, blocks, secure, local_steps)
    upload = upload_update.with_options(retries=config.orchestration.upload_retries)
    return ClientRound(trained, upload.submit(config, trained))
