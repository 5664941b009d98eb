"""Fewer bytes each way: FFA-LoRA (only B trained and sent), the global adapter broadcast as a
quantised delta, and low-bit codes under secure aggregation, each in a real federation."""

from __future__ import annotations

import pytest

from fedlib import storage
from fedlib.config import ConfigError, load_config, parse_config
from fedlib.federation import checkpoint_store, initial_adapter, keyring
from flows.federated_training import federated_training
from tests.conftest import stored_update_context, tiny_config_dict, write_config


def _federation(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws", "gcp"), **sections):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=clouds)
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    path = write_config(tmp_path, raw)
    return federated_training(str(path)), load_config(path)


def _remove(url: str) -> None:
    fs, path = storage.filesystem(url)
    fs.rm(path)


def test_ffa_lora_trains_and_sends_only_b(tmp_path, corpus_dir, tiny_model_dir):
    manifests, config = _federation(tmp_path, corpus_dir, tiny_model_dir, lora={"freeze_a": True})
    store = checkpoint_store(config)
    start, end = initial_adapter(config), store.adapter(2)
    a_names = [n for n in start if ".lora_A." in n]
    b_names = [n for n in start if ".lora_B." in n]
    assert a_names and b_names and set(start) == set(end)
    assert all(start[n].equal(end[n]) for n in a_names)  # A never moves
    assert all(float(end[n].abs().sum()) > 0 for n in b_names)  # B learnt from zero
    assert manifests[-1].perplexity < manifests[0].perplexity
    # What a client uploads holds B only (the rest is the envelope and the client's report).
    from fedlib.aggregator import Expected, open_client_update
    from fedlib.federation import aggregator_update_key

    blob = storage.read_limited(manifests[1].clients["aws"].object_url, 1 << 30)
    key = aggregator_update_key(keyring(config), "aws")
    template = {n: start[n] for n in b_names}
    update, _ = open_client_update(blob, key, stored_update_context(config, "aws", 1, blob), template, Expected(10**6, 10))
    assert set(update.delta) == set(b_names)
    sent, b_bytes = manifests[1].clients["aws"].bytes_uploaded, sum(4 * start[n].numel() for n in b_names)
    assert b_bytes < sent < b_bytes + 4096 < sum(4 * t.numel() for t in start.values()) + 4096


def test_ffa_lora_refuses_what_would_move_a(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["lora"]["freeze_a"] = True
    raw["clouds"][0]["lora_rank"] = 2
    with pytest.raises(ConfigError, match="lora.freeze_a"):
        parse_config(raw)


def test_the_global_goes_down_as_a_quantised_change_that_clients_rebuild_exactly(tmp_path, corpus_dir, tiny_model_dir):
    compression = {"codecs": ["int2", "zstd"], "broadcast": ["int2", "zstd"], "error_feedback": True}
    manifests, config = _federation(tmp_path, corpus_dir, tiny_model_dir, compression=compression, training={"rounds": 3})
    store = checkpoint_store(config)
    full = manifests[0].adapter_bytes
    for m in manifests[1:]:
        assert 0 < m.broadcast_bytes < full / 4  # 2-bit codes and bf16 block scales, zstd'd
        # Round 1 starts from the seeded initial adapter, built where the client is: only the
        # manifest crosses. Later rounds read the manifest and that round's broadcast.
        parent = manifests[m.round - 1]
        expected = store.manifest_read(parent.round)[1] + parent.broadcast_bytes
        assert all(r.bytes_downloaded == expected for r in m.clients.values())
    assert manifests[-1].perplexity < manifests[0].perplexity
    # The aggregator keeps what the broadcast codecs held back, for the next round's change.
    from fedlib.broadcast import split_state

    _, residual = split_state(store.strategy_state_of(manifests[-1]))
    assert residual and sum(float(v.abs().sum()) for v in residual.values()) > 0
    # What a client holds sits in its own bucket, sealed.
    from fedlib.federation import global_for_client, held_global

    ring = keyring(config)
    held = held_global(config, ring, "aws", None)
    assert b'"dtype"' not in storage.read_limited(held.url, 1 << 30) and held.load() is not None
    # Without it, a client rebuilds from the seeded start; a broadcast tampered with in the
    # aggregator's store breaks the chain of digests, and the client reads the full adapter.
    _remove(held.url)
    rebuilt = global_for_client(config, ring, store, manifests[2], "aws", None)
    assert rebuilt.downloaded < full and all(rebuilt.adapter[n].equal(v) for n, v in store.adapter(2).items())
    _remove(held.url)
    url = store.broadcast_url(2, manifests[2].broadcast_sha256)
    blob = bytearray(storage.read_limited(url, 1 << 30))
    blob[-1] ^= 1
    storage.write_atomic(url, bytes(blob))
    fallback = global_for_client(config, ring, store, manifests[2], "aws", None)
    assert fallback.downloaded > full and all(fallback.adapter[n].equal(v) for n, v in store.adapter(2).items())
