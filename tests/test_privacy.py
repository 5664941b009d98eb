"""DP-FedAvg: clipping bounds every client update, noise has the promised scale, ε is opacus's own,
and a federation stops at its ε budget."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedlib.config import load_config
from fedlib.privacy.accountant import epsilon_after, rounds_within_budget
from fedlib.privacy.dp import DifferentialPrivacy, clip_update_inplace, update_norm
from fedlib.strategies import ClientUpdate, make_strategy
from fedlib.wire import storage
from fedlib.wire.envelope import open_sealed
from fedlib.wire.serialization import bytes_to_tensors
from flows.federated_training import federated_training
from tasks.from_config import aggregator_update_key, keyring
from tests.conftest import stored_update_context, tiny_config_dict, write_config


def test_clipping_bounds_the_whole_update():
    big = {"a": torch.full((3,), 4.0), "b": torch.full((1,), 4.0)}  # norm 8
    assert clip_update_inplace(big, 2.0) == pytest.approx(8.0)
    assert update_norm(big) == pytest.approx(2.0)
    assert torch.allclose(big["a"], torch.full((3,), 1.0))  # scaled, direction kept
    small = {"a": torch.tensor([0.3, 0.4])}
    assert clip_update_inplace(small, 2.0) == pytest.approx(0.5)
    assert torch.equal(small["a"], torch.tensor([0.3, 0.4]))  # untouched below the bound


def test_without_noise_it_is_the_uniform_mean_of_clipped_updates():
    glob = {"w": torch.zeros(2)}
    updates = [ClientUpdate("x", 1000, {"w": torch.tensor([3.0, 4.0])}), ClientUpdate("y", 1, {"w": torch.tensor([0.0, 1.0])})]
    dp = DifferentialPrivacy(make_strategy("fedavg"), clip_norm=1.0, noise_multiplier=0.0, generator=torch.Generator())
    out = dp.aggregate(1, glob, updates)
    # x clipped to [0.6, 0.8]; y unchanged [0, 1]; equal weights despite 1000 vs 1 examples.
    torch.testing.assert_close(out["w"], torch.tensor([0.3, 0.9]))


def test_noise_has_standard_deviation_z_c_over_n():
    n, z, c = 4, 1.5, 0.5
    glob = {"w": torch.zeros(200_000)}
    updates = [ClientUpdate(f"c{i}", 1, {"w": torch.zeros(200_000)}) for i in range(n)]
    dp = DifferentialPrivacy(make_strategy("fedavg"), c, z, torch.Generator().manual_seed(3))
    out = dp.aggregate(1, glob, updates)["w"]
    assert float(out.std()) == pytest.approx(z * c / n, rel=0.01)
    assert abs(float(out.mean())) < 0.01


@pytest.mark.parametrize(("z", "q", "steps"), [(1.0, 1.0, 3), (0.8, 0.25, 50), (2.0, 0.1, 200)])
def test_epsilon_is_opacus_own_computation(z, q, steps):
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert epsilon_after(steps, z, q, 1e-5) == pytest.approx(float(expected), rel=1e-9)
    assert epsilon_after(steps + 1, z, q, 1e-5) > epsilon_after(steps, z, q, 1e-5)


def test_rounds_within_budget():
    budget = epsilon_after(2, 1.2, 1.0, 1e-5) * 1.001
    assert rounds_within_budget(budget, 1.2, 1.0, 1e-5) == 2
    assert rounds_within_budget(1e-6, 1.2, 1.0, 1e-5) == 0


def test_dp_federation_clips_every_update_and_stops_at_its_budget(tmp_path, corpus_dir, tiny_model_dir):
    clip, z = 0.05, 1.2
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws", "gcp", "azure"))
    raw["training"].update(rounds=5, learning_rate=0.05)  # big steps: the clip certainly binds
    raw["privacy"] = {
        "enabled": True,
        "clip_norm": clip,
        "noise_multiplier": z,
        "delta": 1e-5,
        "epsilon_budget": epsilon_after(2, z, 1.0, 1e-5) * 1.001,
        "noise_seed": 1,
    }
    path = write_config(tmp_path, raw)
    manifests = federated_training(str(path))
    assert [m.round for m in manifests] == [0, 1, 2]  # round 3 would overspend ε
    assert [m.privacy.epsilon for m in manifests[1:]] == pytest.approx([epsilon_after(r, z, 1.0, 1e-5) for r in (1, 2)])

    config = load_config(path)
    ring = keyring(config)
    norms = []
    for cloud in config.clouds:
        for obj in storage.list_prefix(config.storage_url(cloud)):
            if obj.endswith(".shard"):
                continue  # the client's training data, distributed to it
            round_number = int(re.search(r"round-(\d+)", obj).group(1))
            blob = open(obj, "rb").read()
            ctx = stored_update_context(config, cloud.name, round_number, blob)
            norms.append(update_norm(bytes_to_tensors(open_sealed(blob, aggregator_update_key(ring, cloud.name), ctx))))
    assert len(norms) == 6
    assert max(norms) <= clip * (1 + 1e-5) and min(norms) > clip * 0.99  # every update clipped to C

    history = MlflowClient(config.tracking_uri).get_metric_history(manifests[0].mlflow_run_id, "privacy/epsilon")
    assert sorted((m.step, round(m.value, 9)) for m in history) == [(r, round(manifests[r].privacy.epsilon, 9)) for r in (1, 2)]
    assert np.isfinite([m.eval_loss for m in manifests]).all()
