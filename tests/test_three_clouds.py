"""One client per provider, each writing to its own real emulated object store on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
import yaml

from fedlib.config import load_config
from fedlib.wire import storage
from flows.federated_training import federated_training
from tasks.credentials import storage_options
from tasks.from_config import checkpoint_store, shard_place, update_url
from tests.conftest import cloud_clouds, scan_ciphertext_only, tiny_config_dict, write_config

CLOUDS = ("aws", "gcp", "azure")


@pytest.fixture
def cloud_credentials(emulators, monkeypatch):
    """AWS keys in the provider's environment variables; Azure's connection string in a Prefect
    Secret block on the (real, ephemeral) Prefect API; GCS anonymous."""
    from prefect.blocks.system import Secret

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    Secret(value={"connection_string": emulators["azure"].connection_string}).save("azurite-connection", overwrite=True)


def _config(folder: Path, corpus_dir, tiny_model_dir, clouds, checkpoints: dict | None = None, **training):
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_config_dict(folder, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    if clouds is not None:
        raw["clouds"] = clouds
    raw["federation"].update(checkpoints or {})
    raw["training"].update(training)
    return write_config(folder, raw)


def test_three_providers_match_a_local_run(tmp_path, corpus_dir, tiny_model_dir, emulators, cloud_credentials):
    # The signed checkpoints live in a bucket too (GCS here), not on the aggregator's disk.
    checkpoints = {
        "checkpoints": "gs://checkpoints-match/federations",
        "checkpoint_options": {"endpoint_url": emulators["gcs"].url, "token": "anon"},
    }
    emulated = _config(tmp_path / "emulated", corpus_dir, tiny_model_dir, cloud_clouds(emulators, "match"), checkpoints)
    local = _config(tmp_path / "local", corpus_dir, tiny_model_dir, None)
    manifests = federated_training(str(emulated))
    assert [m.accepted for m in manifests[1:]] == [list(CLOUDS)] * 2
    federated_training(str(local))

    config = load_config(emulated)
    options = storage_options(config, CLOUDS)
    for cloud in config.clouds:
        bucket = config.storage_url(cloud).split("://", 1)[1].split("/", 1)[0]
        found = storage.list_prefix(config.storage_url(cloud), options[cloud.name])
        shard = shard_place(config, cloud.name).url.split("://", 1)[1]
        assert found == [shard, *(f"{bucket}/updates/test/round-000{r}/{cloud.name}.update" for r in (1, 2))], found
    assert scan_ciphertext_only(config, options) == 6 + 3  # and each client's data shard

    stored = storage.list_prefix(config.checkpoint_url, config.federation.checkpoint_options)
    store = checkpoint_store(config)
    for r in range(3):
        digest = store.manifest(r).adapter_sha256
        assert {
            f"checkpoints-match/federations/test/round-000{r}/{name}" for name in ("manifest.json", f"adapter-{digest[:16]}.safetensors")
        } <= set(stored)
    assert not (config.data_path / "checkpoints").exists()
    emulated_adapter = checkpoint_store(config).adapter(2)
    local_adapter = checkpoint_store(load_config(local)).adapter(2)
    assert emulated_adapter.keys() == local_adapter.keys()
    for name in emulated_adapter:
        torch.testing.assert_close(emulated_adapter[name], local_adapter[name], rtol=1e-4, atol=1e-6)


def _failed_attempts(task_name: str, since: datetime) -> bool:
    """Whether a task run of that name started after `since` has failed an attempt: it is
    awaiting or running its retry. Read with Prefect's sync client, from any thread."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    runs_filter = TaskRunFilter(name=TaskRunFilterName(any_=[task_name]), start_time=TaskRunFilterStartTime(after_=since))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=runs_filter, limit=5)
    return any(run.run_count > 1 or (run.state is not None and run.state.name in ("AwaitingRetry", "Retrying")) for run in runs)


def _upload_attempts(task_name: str) -> int:
    """Attempts of the newest task run of that name (earlier tests reuse the names)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[task_name])),
                sort=TaskRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            )
        return runs[0].run_count

    return asyncio.run(read())


def test_s3_restart_during_a_round_is_retried(tmp_path, corpus_dir, tiny_model_dir, emulators, cloud_credentials):
    """S3 goes down before round 2 (aws holds its shard since round 1) and comes back once
    another client's upload has landed: aws's upload fails, is retried with backoff, and the
    round completes with all three."""
    clouds = cloud_clouds(emulators, "restart")
    path = _config(tmp_path, corpus_dir, tiny_model_dir, clouds, rounds=1)
    federated_training(str(path))
    config = load_config(path)
    gcp_object = update_url(config, "gcp", 2)
    gcp_options = storage_options(config, ["gcp"])["gcp"]

    def restart_once_aws_failed():
        """S3 comes back once gcp's upload has landed and aws's first upload attempt has failed
        (Prefect has it awaiting its retry): both read from the API, not waited for."""
        begun = datetime.now(UTC)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if storage.exists(gcp_object, gcp_options) and _failed_attempts("upload-aws-round-2", begun):
                break
            time.sleep(0.2)
        emulators["s3"].start()

    emulators["s3"].stop()
    restarter = threading.Thread(target=restart_once_aws_failed)
    restarter.start()
    try:
        manifests = federated_training(str(path))
    finally:
        restarter.join()
    assert manifests[-1].round == 2 and manifests[-1].accepted == list(CLOUDS)
    assert _upload_attempts("upload-aws-round-2") > 1
    assert _upload_attempts("upload-gcp-round-2") == 1


def test_s3_outage_past_the_retries_is_a_clear_client_failure(tmp_path, corpus_dir, tiny_model_dir, emulators, cloud_credentials):
    path = _config(tmp_path, corpus_dir, tiny_model_dir, cloud_clouds(emulators, "outage"), rounds=1)
    raw = yaml.safe_load(path.read_text())
    raw["orchestration"] = {"upload_retries": 1}
    path.write_text(yaml.safe_dump(raw))
    federated_training(str(path))  # round 1: aws receives its shard
    emulators["s3"].stop()
    try:
        manifests = federated_training(str(path))
    finally:
        emulators["s3"].start()
    last = manifests[-1]
    assert last.accepted == ["gcp", "azure"]
    assert last.rejected["aws"].reason == "client_failed"
    assert emulators["s3"].url in last.rejected["aws"].detail  # names the endpoint it could not reach
    assert last.round == 2
    assert _upload_attempts("upload-aws-round-2") == 2


def test_a_store_that_stops_reading_mid_upload_is_a_timed_out_write_not_a_hang(tmp_path, emulators, monkeypatch):
    """The store's host vanishes with half an upload through (a gate holds the PUT and never
    reads on): the write gives up at its deadline with fsspec's FSTimeoutError, which the task's
    retries see, instead of waiting for the kernel to drop the connection (~15 minutes)."""
    import subprocess
    import sys

    from fsspec.exceptions import FSTimeoutError

    from scripts.emulators import free_port
    from tests.conftest import ROOT
    from tests.parties import GateControl

    port, control = free_port(), tmp_path / "gate.sock"
    target = emulators["s3"].url.rsplit(":", 1)
    gate = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "drill" / "gate.py"), "127.0.0.1", str(port), "127.0.0.1", target[1], str(control)]
    )
    try:
        while not control.exists():
            assert gate.poll() is None, "the gate did not start"
            time.sleep(0.05)
        options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        storage.write_atomic("s3://stalled/warm-up", b"x", options)  # the bucket exists; the connection is pooled
        held = GateControl(control)
        held.arm(r"^PUT /stalled/adapter", 0.5)
        monkeypatch.setattr(storage, "WRITE_GRACE_S", 2.0)
        body = bytes(64 * 1024 * 1024)  # more than the kernel buffers between writer and gate hold
        monkeypatch.setattr(storage, "WRITE_FLOOR_BYTES_PER_S", len(body))  # a deadline of 3 s
        outcome: list[BaseException] = []

        def write() -> None:
            try:
                storage.write_atomic("s3://stalled/adapter", body, options)
            except BaseException as error:  # noqa: BLE001 - what the writer ended with is the result
                outcome.append(error)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        assert held.held(60).startswith("PUT /stalled/adapter")
        writer.join(120)  # the kernel alone would hold it for ~15 minutes
        assert not writer.is_alive(), "the write is still hanging on a store that stopped reading"
        assert len(outcome) == 1 and isinstance(outcome[0], FSTimeoutError), outcome
        held.drop()
    finally:
        gate.kill()
        gate.wait()
