"""FedAvg against a hand-computed weighted mean."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedlib.strategies import ClientUpdate, make_strategy


def test_fedavg_matches_hand_computed_mean():
    glob = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    updates = [
        ClientUpdate("x", 1, {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}),
        ClientUpdate("y", 3, {"a": torch.tensor([-1.0, 4.0]), "b": torch.tensor([[0.0]])}),
    ]
    out = make_strategy("fedavg").aggregate(1, glob, updates)
    # a: [1,2] + (1*[3,0] + 3*[-1,4]) / 4 = [1,2] + [0, 3] ; b: 0 + (4 + 0)/4 = 1
    assert torch.equal(out["a"], torch.tensor([1.0, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[1.0]]))
    assert out["a"].dtype == torch.float32


def test_fedavg_equals_reference_and_is_permutation_invariant():
    gen = torch.Generator().manual_seed(0)
    glob = {"w": torch.randn(6, 5, generator=gen)}
    updates = [ClientUpdate(f"c{i}", n, {"w": torch.randn(6, 5, generator=gen)}) for i, n in enumerate((5, 17, 2, 40))]
    total = sum(u.num_examples for u in updates)
    reference = glob["w"] + sum(u.delta["w"] * (u.num_examples / total) for u in updates)
    for order in itertools.permutations(updates):
        out = make_strategy("fedavg").aggregate(1, glob, iter(order))  # a one-pass stream is enough
        torch.testing.assert_close(out["w"], reference, rtol=0, atol=1e-6)


def test_fedavg_refuses_empty_and_bad_counts():
    strategy = make_strategy("fedavg")
    with pytest.raises(ValueError, match="no updates"):
        strategy.aggregate(3, {"w": torch.zeros(1)}, [])
    with pytest.raises(ValueError, match="0 examples"):
        strategy.aggregate(3, {"w": torch.zeros(1)}, [ClientUpdate("x", 0, {"w": torch.ones(1)})])
    with pytest.raises(KeyError, match="unknown strategy"):
        make_strategy("fedmagic")
