"""Secure aggregation in real federation runs: the aggregate equals plain FedAvg within the
fixed-point tolerance, every stored upload looks like uniform noise to the aggregator itself, and
a client that drops after the setup (its masks already inside the others' updates) is recovered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from fedlib.config import ConfigError, load_config, parse_config
from fedlib.privacy.dp import add_noise_share_inplace
from fedlib.secagg.fixedpoint import from_wire
from fedlib.wire import storage
from fedlib.wire.envelope import open_sealed
from fedlib.wire.serialization import bytes_to_tensors, read_metadata
from flows.federated_training import federated_training
from tasks.from_config import aggregator_update_key, checkpoint_store, keyring, update_url
from tests.conftest import stored_update_context, tiny_config_dict, write_config

CLOUDS = ("aws", "azure", "gcp")


def _run(tmp_path, corpus_dir, model_dir, name: str, secure: bool, drop: str | None, privacy: dict | None = None):
    """One round over three clouds; a folder stands where `drop`'s update object goes, so its
    upload fails after it took part in the setup (posted to the same bucket): it vanishes after
    masking."""
    folder = tmp_path / name
    folder.mkdir()
    raw = tiny_config_dict(folder, corpus_dir, model_dir, clouds=CLOUDS)
    raw["training"]["rounds"] = 1
    raw["aggregation"]["min_clients"] = 2
    raw["orchestration"] = {"upload_retries": 0}
    if secure:
        raw["secure_aggregation"] = {"enabled": True, "threshold": 2}
    if privacy:
        raw["privacy"] = privacy
    path = write_config(folder, raw)
    if drop:
        Path(update_url(load_config(path), drop, 1).removeprefix("file://")).mkdir(parents=True)
    manifests = federated_training(str(path))
    return load_config(path), manifests[-1]


def _uniformity_p_value(residues: torch.Tensor, bins: int = 64) -> float:
    counts = np.bincount((residues.flatten().numpy() >> 26).astype(np.int64), minlength=bins)
    expected = residues.numel() / bins
    return float(chi2.sf(((counts - expected) ** 2 / expected).sum(), df=bins - 1))


@pytest.mark.parametrize("drop", [None, "gcp"])
def test_secure_round_equals_fedavg_and_uploads_look_uniform(tmp_path, corpus_dir, tiny_model_dir, drop):
    plain_config, plain = _run(tmp_path, corpus_dir, tiny_model_dir, "plain", secure=False, drop=drop)
    config, secure = _run(tmp_path, corpus_dir, tiny_model_dir, "secure", secure=True, drop=drop)

    survivors = [c for c in CLOUDS if c != drop]
    assert sorted(secure.accepted) == sorted(plain.accepted) == survivors
    info = secure.secure_aggregation
    assert info["dropped_after_setup"] == ([drop] if drop else [])
    assert info["revealed_by"] == survivors
    if drop:
        assert secure.rejected[drop].reason == "client_failed"

    # The same FedAvg as without masks: each client's fixed-point rounding is 2^-25 (24 fractional
    # bits), far inside this tolerance; training is the same on both sides.
    plain_adapter = checkpoint_store(plain_config).adapter(1)
    secure_adapter = checkpoint_store(config).adapter(1)
    start = checkpoint_store(config).adapter(0)
    moved = max(float((plain_adapter[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the round did change the adapter, so equality below means something
    for name in plain_adapter:
        torch.testing.assert_close(secure_adapter[name], plain_adapter[name], atol=1e-6, rtol=0)

    # What the aggregator decrypts from each stored upload: int32 residues that pass for uniform
    # noise, while the plain run's update for the same client plainly does not.
    ring = keyring(config)
    for client in survivors:
        blob = storage.read_limited(update_url(config, client, 1), 1 << 30)
        payload = open_sealed(blob, aggregator_update_key(ring, client), stored_update_context(config, client, 1, blob))
        tensors = bytes_to_tensors(payload)
        assert {t.dtype for t in tensors.values()} == {torch.int32}
        assert int(read_metadata(payload)["weight"]) == int(read_metadata(payload)["num_examples"]) > 0
        flat = torch.cat([v.flatten() for v in from_wire(tensors).values()])
        assert _uniformity_p_value(flat) > 1e-6, client
    if drop:
        assert Path(update_url(config, drop, 1).removeprefix("file://")).is_dir()  # the folder that stopped its upload


def test_dp_under_secure_aggregation_is_the_uniform_mean_of_clipped_updates(tmp_path, corpus_dir, tiny_model_dir):
    """Without noise, DP-FedAvg's mean is the same whether the aggregator clips and averages in
    the clear or the clients clip, weigh themselves 1 and the masked sum is averaged."""
    privacy = {"enabled": True, "clip_norm": 0.05, "noise_multiplier": 0.0}
    central_config, central = _run(tmp_path, corpus_dir, tiny_model_dir, "central", False, None, privacy)
    config, secure = _run(tmp_path, corpus_dir, tiny_model_dir, "secure", True, None, privacy)
    assert min(r.update_norm for r in central.clients.values()) > 0.05  # the clip binds (the same training)
    assert all(r.update_norm is None for r in secure.clients.values())  # the aggregator learns no norm under masking
    central_adapter, secure_adapter = checkpoint_store(central_config).adapter(1), checkpoint_store(config).adapter(1)
    for name in central_adapter:
        torch.testing.assert_close(secure_adapter[name], central_adapter[name], atol=1e-6, rtol=0)


def test_secure_aggregation_config_is_checked(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["secure_aggregation"] = {"enabled": True, "threshold": 4}
    with pytest.raises(ConfigError, match="secure_aggregation.threshold=4 exceeds the 3"):
        parse_config(raw, "fed.yaml")
    raw["secure_aggregation"] = {"enabled": True}
    assert parse_config(raw).secagg_threshold == 2
    raw["aggregation"]["min_clients"] = 3
    assert parse_config(raw).secagg_min_survivors == 3
    one = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws",))
    one["secure_aggregation"] = {"enabled": True}
    with pytest.raises(ConfigError, match="needs at least 2 clouds"):
        parse_config(one, "fed.yaml")


def test_split_noise_adds_up_to_the_configured_noise():
    """Each of k clients adds N(0, σ²/k): any k of them sum to N(0, σ²)."""
    k, sigma = 3, 0.2
    total = torch.zeros(300_000, dtype=torch.float64)
    for i in range(k):
        share = {"w": torch.zeros(300_000, dtype=torch.float64)}
        add_noise_share_inplace(share, sigma, k, torch.Generator().manual_seed(i))
        assert float(share["w"].std()) == pytest.approx(sigma / k**0.5, rel=0.01)
        total += share["w"]
    assert float(total.std()) == pytest.approx(sigma, rel=0.01)
