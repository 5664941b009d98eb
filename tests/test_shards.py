"""Each client's training data: the simulated mode's shard, sealed for that client alone and
holding exactly the blocks the partition gave it, and a client's own files, read by it alone and
re-read when they change."""

from __future__ import annotations

import pytest
import torch

from fedlib.config import parse_config
from fedlib.data.shards import distribute_shard, read_shard
from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire import storage
from tasks.from_config import aggregator_update_key, client_update_key, keyring, load_data, own_data, partition_clients, shard_place
from tests.conftest import tiny_config_dict


def test_a_shard_holds_its_blocks_and_opens_for_its_client_only(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    for cloud in raw["clouds"]:
        cloud["storage"] = (tmp_path / "buckets" / cloud["name"]).as_uri()  # not under data_dir, which holds the cache
    config = parse_config(raw)
    ring = keyring(config, create=True)
    data = load_data(config)
    assignment = partition_clients(config, data)
    train, validation = data.train.select(assignment["aws"]), data.validation(0, 2, 8)
    distribute_shard(shard_place(config, "aws"), train, validation, aggregator_update_key(ring, "aws"), None)

    received = read_shard(shard_place(config, "aws"), client_update_key(ring, "aws"), None)
    assert torch.equal(received.train.input_ids, train) and torch.equal(received.validation.input_ids, validation)
    assert len(validation) == 8 and not set(map(tuple, validation.tolist())) & set(map(tuple, data.evaluation.tolist()))

    # gcp's key does not open aws's shard, and an edited byte is an authentication failure.
    with pytest.raises(UpdateRejected) as refused:
        read_shard(
            shard_place(
                config.model_copy(update={"federation": config.federation.model_copy(update={"data_dir": str(tmp_path / "gcp")})}), "aws"
            ),
            client_update_key(ring, "gcp"),
            None,
        )
    assert refused.value.reason in (Reason.WRONG_KEY, Reason.AUTHENTICATION_FAILED)
    url = shard_place(config, "aws").url
    blob = bytearray(storage.read_limited(url, 1 << 30))
    blob[-20] ^= 1
    storage.write_atomic(url, bytes(blob))
    with pytest.raises(UpdateRejected) as tampered:
        read_shard(
            shard_place(
                config.model_copy(update={"federation": config.federation.model_copy(update={"data_dir": str(tmp_path / "fresh")})}), "aws"
            ),
            client_update_key(ring, "aws"),
            None,
        )
    assert tampered.value.reason == Reason.AUTHENTICATION_FAILED


def test_own_data_is_read_by_its_client_and_reread_when_it_changes(tmp_path, corpus_dir, tiny_model_dir):
    text = (corpus_dir / "comedies" / "twelfth-night.md").read_text()
    own = tmp_path / "aws-data" / "train.md"
    own.parent.mkdir()
    own.write_text(text[: len(text) // 2])
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    for cloud in raw["clouds"]:
        cloud["data"] = [own.as_uri()]
    config = parse_config(raw)
    assert not config.simulated
    first = own_data(config, "aws", None)
    assert first.source == own.as_uri() and len(first.train) > 0 and len(first.validation) == 0
    own.write_text(text)  # the client's data grew: the cache must not hand back the old blocks
    assert len(own_data(config, "aws", None).train) > len(first.train)
