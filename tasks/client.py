"""A client's round: runs where the client's data lives, writes only to the client's bucket.

Training and upload are separate tasks so that a storage fault retries the upload with backoff,
not the training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.tasks import exponential_backoff

from fedlib.config import FederationConfig
from fedlib.model.base import check_base_model
from fedlib.model.threads import intra_op_threads
from fedlib.privacy.policy import require_secure_request
from fedlib.round.client import SealedUpdate, train_and_seal, upload_sealed
from fedlib.secagg.client import SecureRound
from fedlib.secagg.messages import TrainRequest
from fedlib.secagg.protocol import BadSetups, open_inbox
from fedlib.update.report import ClientReport
from fedlib.wire.keys import KeyRing
from fedlib.wire.sealed_stores import CarriedResidual, ResidualStore
from tasks.credentials import party_keys, storage_options
from tasks.from_config import (
    checkpoint_store,
    client_data,
    client_update_key,
    global_for_client,
    local_round,
    outbox,
    residual_store,
    secagg_session,
)
from tasks.party_policy import party_policy


@task(name="train-client", task_run_name="train-{client}-round-{round_number}", cache_policy=NO_CACHE)
def train_client(
    config: FederationConfig,
    client: str,
    round_number: int,
    secure: TrainRequest | None = None,
    local_steps: int | None = None,
    threads: int | None = None,
) -> SealedUpdate:
    """Trains on this client's data only (its own files, or the shard distributed to its
    bucket). With `secure` (the secure-aggregation session, the peers' relayed setup messages,
    and the weight scale), the update is masked. `threads`: torch's team for this client, when
    it shares its process with others training at once."""
    ring = party_keys(config, client)  # refuses a config weaker than this client's pinned policy
    policy = party_policy(config, client)
    if policy is not None:  # and a train step that would upload its update unmasked
        require_secure_request(policy, "train", secure is not None, client)
    if secure:  # before training: a peer's setup that does not open is reported, and nothing is masked
        _open_or_complain(config, ring, client, round_number, secure)
    store = checkpoint_store(config, ring)
    previous, manifest_bytes = store.head_read(round_number - 1)  # signature, federation and round checked
    check_base_model(previous.base_model, config.model.source)
    received = global_for_client(config, ring, store, previous, client, storage_options(config, [client])[client])
    global_adapter, downloaded = received.adapter, manifest_bytes + received.downloaded
    parent = previous.adapter_sha256
    key = client_update_key(ring, client)
    data = client_data(config, client, key, storage_options(config, [client])[client])
    get_run_logger().info(
        "client %s round %d: training on its own data only: %s (%d examples, %d validation)",
        client,
        round_number,
        data.source,
        len(data.train),
        len(data.validation),
    )
    masking = None
    if secure:
        session = secagg_session(config, round_number, secure.session_id)
        masking = SecureRound(ring, session, secure.inbox, secure.weight_scale, secure.code_scale, secure.max_examples)
    residuals = None
    if config.compression.error_feedback and config.lossy_updates:
        carried_from = round_number - 1 if client in previous.accepted else store.last_accepted_round(client, round_number - 1)
        residuals = CarriedResidual(_residuals(config, client), carried_from)
    salt = ring.client_derived_secret(client, f"data-digest/{config.federation.id}")
    job = local_round(config, client, round_number, local_steps, parent, downloaded, salt)
    with intra_op_threads(threads):
        return train_and_seal(job, global_adapter, data, key, masking, residuals)


def _open_or_complain(config: FederationConfig, ring: KeyRing, client: str, round_number: int, secure: TrainRequest) -> None:
    """Open every relayed setup message; if any does not, post the senders, sealed for the
    aggregator, as this client's complaint (`fedlib.secagg.protocol.BadSetups`), and fail."""
    try:
        open_inbox(ring, client, secagg_session(config, round_number, secure.session_id), secure.inbox)
    except BadSetups as bad:
        options = storage_options(config, [client])[client]
        outbox(config, client, round_number, client_update_key(ring, client), options).post(
            "complaint", secure.session_id, bad.complaint_json()
        )
        raise


def _residuals(config: FederationConfig, client: str) -> ResidualStore:
    return residual_store(config, party_keys(config, client), client, storage_options(config, [client])[client])


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
    secure: TrainRequest | None = None,
    local_steps: int | None = None,
    threads: int | None = None,
) -> ClientRound:
    """train → upload, as two tasks that run concurrently with other clients'."""
    trained = train_client.submit(config, client, round_number, secure, local_steps, threads)
    upload = upload_update.with_options(retries=config.orchestration.upload_retries)
    return ClientRound(trained, upload.submit(config, trained))
