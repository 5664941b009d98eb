"""Real clients train the tiny model and upload; the aggregator rejects bad objects by name and
the round goes on with the rest, or stops with a clear message when quorum fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fedlib.config import parse_config
from fedlib.data.shards import ClientData
from fedlib.rejection import QuorumNotMet, Rejection
from fedlib.round.client import train_and_seal, upload_sealed
from fedlib.strategies import make_strategy
from fedlib.update.chain import Expected, open_client_update
from fedlib.wire import storage
from tasks.from_config import (
    aggregate,
    aggregator_update_key,
    client_update_key,
    initial_adapter,
    keyring,
    load_data,
    local_round,
    partition_clients,
    round_intake,
    update_url,
)
from tests.conftest import tiny_config_dict

CLOUDS = ("aws", "gcp", "azure")
LIMITS = Expected(max_examples=10**9, max_local_steps=100)


def train_client_update(config, client, round_number, global_adapter, shard, key):
    """One client's round with no orchestrator: train on `shard`, seal, upload."""
    data = ClientData.of_blocks(shard, shard[:0], "<given>")
    return upload_sealed(train_and_seal(local_round(config, client, round_number), global_adapter, data, key))


@pytest.fixture
def trained_round(tmp_path, corpus_dir, tiny_model_dir):
    """Round 1 of a 3-client federation: every client has uploaded a sealed update."""
    config = parse_config(tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS))
    data = load_data(config)
    assignment = partition_clients(config, data)
    ring = keyring(config, create=True)
    global_adapter = initial_adapter(config)
    reports = {
        c: train_client_update(config, c, 1, global_adapter, data.train.select(assignment[c]), client_update_key(ring, c)) for c in CLOUDS
    }
    return config, {c: aggregator_update_key(ring, c) for c in CLOUDS}, global_adapter, reports


def _path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _expected(config, key, global_adapter, clients):
    """The FedAvg of exactly these clients' authentic updates, their claimed counts held to
    `aggregation.max_weight_share` (this aggregator was not told the shards)."""
    from fedlib.strategies.shares import capped_updates
    from fedlib.wire.envelope import EnvelopeContext

    updates = [
        open_client_update(
            storage.read_limited(update_url(config, c, 1), 1 << 30), key[c], EnvelopeContext("test", 1, c), global_adapter, LIMITS
        )[0]
        for c in clients
    ]
    return make_strategy("fedavg").aggregate(1, global_adapter, capped_updates(updates, config.aggregation.max_weight_share))


def _aggregate(config, key, global_adapter, failed=None):
    return aggregate(config, round_intake(config, 1, list(CLOUDS), key, global_adapter, failed=failed), global_adapter)


def test_clean_round_uses_everyone(trained_round):
    config, key, global_adapter, reports = trained_round
    adapter, report = _aggregate(config, key, global_adapter)
    assert report.accepted == list(CLOUDS) and not report.rejected
    expected = _expected(config, key, global_adapter, CLOUDS)
    for name in adapter:
        torch.testing.assert_close(adapter[name], expected[name])
    assert any(not torch.equal(adapter[n], global_adapter[n]) for n in adapter)  # training moved it
    for c, r in reports.items():
        assert r.object_url == update_url(config, c, 1) and r.bytes_uploaded == _path(r.object_url).stat().st_size


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_tamper, "authentication_failed"),
        (_truncate, "truncated"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_bad_object_is_rejected_and_round_goes_on(trained_round, corrupt, reason, caplog):
    config, key, global_adapter, _ = trained_round
    corrupt(_path(update_url(config, "gcp", 1)))
    with caplog.at_level("WARNING", logger="fedlib.progress"):
        adapter, report = _aggregate(config, key, global_adapter)
    assert report.accepted == ["aws", "azure"]
    assert report.rejected["gcp"].reason == reason
    assert f"client gcp rejected ({reason})" in caplog.text
    expected = _expected(config, key, global_adapter, ["aws", "azure"])
    for name in adapter:
        torch.testing.assert_close(adapter[name], expected[name])


def test_replayed_and_swapped_objects(trained_round):
    config, key, global_adapter, _ = trained_round
    # Every client's round-1 object replayed as its round-2 upload.
    for c in CLOUDS:
        _path(update_url(config, c, 2)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_path(update_url(config, c, 1)), _path(update_url(config, c, 2)))
    with pytest.raises(QuorumNotMet, match="0 of 3 updates accepted"):
        aggregate(config, round_intake(config, 2, list(CLOUDS), key, global_adapter), global_adapter)
    _path(update_url(config, "aws", 2)).unlink()
    aws_key = client_update_key(keyring(config), "aws")
    train_client_update(config, "aws", 2, global_adapter, load_data(config).train.tokens[:8], aws_key)
    _, report = aggregate(config, round_intake(config, 2, list(CLOUDS), key, global_adapter), global_adapter)
    assert report.accepted == ["aws"]
    assert {c: r.reason for c, r in report.rejected.items()} == {"gcp": "wrong_round", "azure": "wrong_round"}
    # aws's object written into gcp's slot (a storage provider swapping clients).
    shutil.copy(_path(update_url(config, "aws", 1)), _path(update_url(config, "gcp", 1)))
    _, report = _aggregate(config, key, global_adapter)
    assert report.rejected["gcp"].reason == "wrong_client" and report.accepted == ["aws", "azure"]


def test_oversized_object_and_failed_client(trained_round):
    config, key, global_adapter, reports = trained_round
    small = config.model_copy(update={"aggregation": config.aggregation.model_copy(update={"max_update_bytes": 1024})})
    with pytest.raises(QuorumNotMet, match=r"0 of 3 updates accepted.*aws: too_large"):
        _aggregate(small, key, global_adapter)
    _, report = _aggregate(config, key, global_adapter, failed={"azure": "RuntimeError: out of memory"})
    assert report.rejected["azure"] == Rejection("client_failed", "RuntimeError: out of memory")
    assert report.accepted == ["aws", "gcp"]


def test_quorum_failure_names_the_rejections(trained_round):
    config, key, global_adapter, _ = trained_round
    strict = config.model_copy(update={"aggregation": config.aggregation.model_copy(update={"min_clients": 3})})
    _tamper(_path(update_url(config, "aws", 1)))
    with pytest.raises(QuorumNotMet, match=r"2 of 3 updates accepted, aggregation.min_clients=3 \(rejected: aws: authentication_failed\)"):
        _aggregate(strict, key, global_adapter)


def test_examples_travel_inside_the_authenticated_payload(trained_round):
    config, key, global_adapter, reports = trained_round
    shards = {c: len(p) for c, p in partition_clients(config, load_data(config)).items()}
    assert {c: r.num_examples for c, r in reports.items()} == shards
    from fedlib.wire.envelope import EnvelopeContext

    blob = storage.read_limited(update_url(config, "gcp", 1), 1 << 30)
    update, _ = open_client_update(blob, key["gcp"], EnvelopeContext("test", 1, "gcp"), global_adapter, LIMITS)
    assert update.num_examples == shards["gcp"]
