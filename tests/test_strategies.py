"""The strategy contract, for every registered strategy: order of clients does not matter,
identical updates give that update back (the weights sum to one), known values by hand, state
that survives a round trip; and the robust ones hold against a poisoned client."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedlib.strategies import ClientUpdate, make_strategy, strategies
from fedlib.strategies.lora_exact import lora_pairs, refactor
from fedlib.strategies.normalized import StepNormalized

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _adapter(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {A: torch.randn(2, 5, generator=gen) * scale, B: torch.randn(4, 2, generator=gen) * scale}


def _updates(n: int = 5, seed: int = 0) -> list[ClientUpdate]:
    return [ClientUpdate(f"c{i}", 10 + 7 * i, _adapter(seed + i, 0.1), local_steps=1 + i) for i in range(n)]


def _close(x: dict, y: dict, atol: float = 1e-6) -> None:
    for name in x:
        torch.testing.assert_close(x[name].double(), y[name].double(), atol=atol, rtol=0)


def _product(state: dict) -> torch.Tensor:
    return state[B].double() @ state[A].double()


OPTIONS = {"krum": {"byzantine": 1, "select": 2}, "trimmed_mean": {"trim": 0.2}}
ALL = sorted(strategies.items)


@pytest.mark.parametrize("name", ALL)
def test_client_order_does_not_matter(name):
    glob = _adapter(99)
    updates = _updates()
    reference = make_strategy(name, OPTIONS.get(name)).aggregate(1, glob, updates)
    for order in list(itertools.permutations(updates))[::17]:
        _close(make_strategy(name, OPTIONS.get(name)).aggregate(1, glob, list(order)), reference, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("fedadam", "fedyogi", "fedadagrad")])
def test_identical_updates_give_that_update(name):
    """The weights sum to one: every client sending Δ moves the adapter by exactly Δ (for
    lora_exact, the product moves to that of the shifted factors)."""
    glob, delta = _adapter(1), _adapter(2, 0.1)
    updates = [ClientUpdate(f"c{i}", 3 + i, delta, local_steps=4) for i in range(5)]
    out = make_strategy(name, OPTIONS.get(name)).aggregate(1, glob, updates)
    expected = {k: glob[k] + delta[k] for k in glob}
    if name == "lora_exact":
        torch.testing.assert_close(_product(out), _product(expected), atol=1e-5, rtol=0)
    else:
        _close(out, expected, atol=1e-6)


def test_known_values_by_hand():
    glob = {"w": torch.tensor([0.0, 0.0])}
    ups = [
        ClientUpdate("a", 1, {"w": torch.tensor([1.0, 10.0])}),
        ClientUpdate("b", 3, {"w": torch.tensor([3.0, -2.0])}),
        ClientUpdate("c", 1, {"w": torch.tensor([100.0, 0.0])}),
    ]
    run = lambda name, **o: make_strategy(name, o).aggregate(1, glob, ups)["w"].tolist()  # noqa: E731
    assert run("fedavg") == pytest.approx([(1 + 9 + 100) / 5, (10 - 6 + 0) / 5])
    assert run("fedprox", mu=0.1) == run("fedavg")  # FedProx differs only in the clients' training
    assert run("median") == pytest.approx([3.0, 0.0])
    assert run("trimmed_mean", trim=0.34) == pytest.approx([3.0, 0.0])  # one cut from each end of three
    assert run("fedavgm", server_lr=0.5, momentum=0.9) == pytest.approx([0.5 * 22.0, 0.5 * 0.8])
    # FedAdam, first round: m = (1−β1)Δ, v = β2·τ² + (1−β2)Δ², step η·m/(√v + τ).
    mean = torch.tensor([22.0, 0.8], dtype=torch.float64)
    m, v = 0.1 * mean, 0.99 * 0.1**2 + 0.01 * mean**2
    assert run("fedadam", server_lr=0.1, tau=0.1) == pytest.approx((0.1 * m / (v.sqrt() + 0.1)).tolist())
    v_yogi = 0.1**2 - 0.01 * mean**2 * torch.sign(0.1**2 - mean**2)
    assert run("fedyogi", server_lr=0.1, tau=0.1) == pytest.approx((0.1 * m / (v_yogi.sqrt() + 0.1)).tolist())
    v_ada = 0.1**2 + mean**2
    assert run("fedadagrad", server_lr=0.1, tau=0.1) == pytest.approx((0.1 * m / (v_ada.sqrt() + 0.1)).tolist())


def test_krum_scores_by_hand():
    glob = {"w": torch.zeros(1)}
    values = [0.0, 1.0, 2.0, 3.0, 50.0]
    ups = [ClientUpdate(f"c{i}", 1, {"w": torch.tensor([v])}) for i, v in enumerate(values)]
    krum = make_strategy("krum", {"byzantine": 1, "select": 1})
    # n − f − 2 = 2 neighbours: scores 0:1+4=5, 1:1+1=2, 2:1+1=2, 3:1+4=5, 50: 47²+48²; a tie of 1 and 2.
    chosen, _ = krum.chosen(1, ups)
    assert chosen[0] in {"c1", "c2"}
    multi = make_strategy("krum", {"byzantine": 1, "select": 4})
    assert multi.aggregate(1, glob, ups)["w"].item() == pytest.approx(1.5)  # 0,1,2,3 kept; 50 never
    with pytest.raises(ValueError, match="needs at least 5"):
        krum.aggregate(1, glob, ups[:4])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_state_round_trips(name):
    """Two rounds in one object equal round one, a save and load, then round two."""
    glob = _adapter(5)
    first, second = _updates(3, 10), _updates(3, 20)
    live = make_strategy(name)
    after_one = live.aggregate(1, glob, first)
    after_two = live.aggregate(2, after_one, second)
    saved = make_strategy(name)
    saved.aggregate(1, glob, first)
    restored = make_strategy(name)
    restored.load_state_dict(saved.state_dict())
    _close(restored.aggregate(2, after_one, second), after_two, atol=1e-9)
    assert saved.state_dict() and all(t.dtype == torch.float64 for t in saved.state_dict().values())
    with pytest.raises(ValueError, match="keeps no state"):
        make_strategy("fedavg").load_state_dict(saved.state_dict())


def test_exact_lora_averages_products_not_factors():
    glob = {A: torch.zeros(2, 5), B: torch.zeros(4, 2)}
    ups = [ClientUpdate("a", 1, _adapter(1)), ClientUpdate("b", 3, _adapter(2))]
    exact = make_strategy("lora_exact").aggregate(1, glob, ups)
    naive = make_strategy("fedavg").aggregate(1, glob, ups)
    target = (1 * _product(ups[0].delta) + 3 * _product(ups[1].delta)) / 4  # rank ≤ 4, adapter rank 2
    u, s, vh = torch.linalg.svd(target)
    best_rank2 = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(_product(exact), best_rank2, atol=1e-5, rtol=0)  # Eckart–Young
    assert torch.linalg.norm(_product(exact) - target) < torch.linalg.norm(_product(naive) - target)
    assert set(lora_pairs(glob)) == {"m.q_proj"}


def test_exact_lora_is_exact_when_ranks_allow_and_pads_missing_directions():
    b1, a1 = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)
    b2, a2 = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)
    b_new, a_new = refactor(torch.cat([b1, b2], 1), torch.cat([a1, a2], 0), rank=3)
    assert b_new.shape == (6, 3) and a_new.shape == (3, 7)
    torch.testing.assert_close(b_new @ a_new, b1 @ a1 + b2 @ a2, atol=1e-10, rtol=0)
    zero_b, zero_a = refactor(torch.zeros(6, 2, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64), rank=2)
    assert torch.count_nonzero(zero_b @ zero_a) == 0


def test_step_normalisation_removes_the_bias_of_longer_local_runs():
    """Two clients drift the same way per step; one takes 10 steps, one 1. FedAvg leans to the
    long run; normalised, each contributes its per-step direction at the mean step count."""
    glob = {"w": torch.zeros(2)}
    per_step_a, per_step_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    ups = [ClientUpdate("a", 1, {"w": per_step_a * 10}, local_steps=10), ClientUpdate("b", 1, {"w": per_step_b}, local_steps=1)]
    plain = make_strategy("fedavg").aggregate(1, glob, ups)["w"]
    normalised = StepNormalized(make_strategy("fedavg")).aggregate(1, glob, ups)["w"]
    assert plain.tolist() == pytest.approx([5.0, 0.5])
    assert normalised.tolist() == pytest.approx([5.5 * 0.5, 5.5 * 0.5])  # τ_eff = 5.5, equal directions
    with pytest.raises(ValueError, match="mean-based"):
        StepNormalized(make_strategy("median"))


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_a_poisoned_client_cannot_drag_robust_aggregators(name):
    glob = _adapter(7)
    honest = _updates(6, 30)
    poisoned = ClientUpdate("evil", 10, {k: v * 100 for k, v in honest[0].delta.items()})
    ups = honest + [poisoned]
    largest = max(float(t.abs().max()) for u in honest for t in u.delta.values())
    robust = make_strategy(name, {"byzantine": 1, "select": 3} if name == "krum" else None).aggregate(1, glob, ups)
    fedavg = make_strategy("fedavg").aggregate(1, glob, ups)
    moved = lambda out: max(float((out[k] - glob[k]).abs().max()) for k in glob)  # noqa: E731
    assert moved(robust) <= largest + 1e-6  # inside the honest updates' range
    assert moved(fedavg) > 5 * largest  # the mean is dragged out of it


def test_options_are_checked_by_name():
    with pytest.raises(ValueError, match="'krum': .*unexpected keyword argument 'f'"):
        make_strategy("krum", {"f": 1})
    with pytest.raises(KeyError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="trim must be in"):
        make_strategy("trimmed_mean", {"trim": 0.5})
    assert math.isclose(make_strategy("fedprox", {"mu": 0.5}).mu, 0.5)


def test_a_smaller_client_rank_keeps_the_applied_product():
    """Cut to rank k and padded back, the adapter applies the global's first k components:
    PEFT's alpha/r scaling is undone on both sides."""
    from fedlib.model.ranks import pad_adapter, truncate_adapter

    glob = {A: torch.randn(4, 5, dtype=torch.float64), B: torch.randn(6, 4, dtype=torch.float64)}
    cut = truncate_adapter(glob, global_rank=4, rank=2)
    assert cut[A].shape == (2, 5) and cut[B].shape == (6, 2)
    alpha = 8
    torch.testing.assert_close(alpha / 2 * cut[B] @ cut[A], alpha / 4 * glob[B][:, :2] @ glob[A][:2])
    padded = pad_adapter(cut, glob, global_rank=4, rank=2)
    assert padded[A].shape == glob[A].shape and padded[B].shape == glob[B].shape
    torch.testing.assert_close(padded[B] @ padded[A], glob[B][:, :2] @ glob[A][:2])
    torch.testing.assert_close(padded[A][2:], glob[A][2:])  # untouched rows: zero delta on the wire
    assert truncate_adapter(glob, 4, 4) is glob


def test_capped_weights_hold_every_claimed_count_to_its_share():
    from fedlib.strategies.shares import capped_weights

    # a claims 10^9 against 100 and 50: lowered to c = ½·(c + 150), so c = 150, half of the total
    assert capped_weights({"a": 10**9, "b": 100, "c": 50}, 0.5) == {"a": 150, "b": 100, "c": 50}
    # counts the aggregator knows (it dealt the shards) are facts: a majority shard stays a majority
    assert capped_weights({"a": 7931, "b": 2901, "c": 2179}, 0.5, known={"a", "b", "c"}) == {"a": 7931, "b": 2901, "c": 2179}
    # a claim beside known counts: c = ½·(7931 + 2179 + c) = 10110
    assert capped_weights({"a": 7931, "b": 10**9, "c": 2179}, 0.5, known={"a", "c"})["b"] == 10110
    # two inflated claims under a third each: c = 0.34·(2c + 2), c = 2.125, rounded down
    assert capped_weights({"a": 10**9, "b": 10**9, "c": 1, "d": 1}, 0.34) == {"a": 2, "b": 2, "c": 1, "d": 1}
    assert capped_weights({"a": 10**9, "b": 3}, 1.0) == {"a": 10**9, "b": 3}  # no bound asked
    assert capped_weights({"a": 10**9}, 0.5) == {"a": 10**9}  # one client is the whole round whatever it claims
