"""Partitions are deterministic, disjoint and complete; Dirichlet skew is visible."""

from __future__ import annotations

import numpy as np
import pytest

from fedlib.data.partition import label_histogram, partition, partitioners

LABELS = [g for g, n in (("tragedy", 300), ("comedy", 200), ("history", 250), ("roman", 150)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_deterministic_disjoint_complete(kind):
    first = partition(LABELS, 3, kind, alpha=0.5, seed=11)
    again = partition(LABELS, 3, kind, alpha=0.5, seed=11)
    other = partition(LABELS, 3, kind, alpha=0.5, seed=12)
    assert first == again
    assert first != other
    flat = [i for part in first for i in part]
    assert len(flat) == len(set(flat)) == len(LABELS)  # disjoint and complete
    assert all(part == sorted(part) and part for part in first)


def test_iid_sizes_even_and_labels_mixed():
    parts = partition(LABELS, 4, "iid", alpha=0.0, seed=0)
    assert {len(p) for p in parts} == {225}
    for histogram in label_histogram(LABELS, parts):
        assert set(histogram) == {"tragedy", "comedy", "history", "roman"}


def _skew(parts) -> float:
    """Mean total-variation distance between each client's label mix and the global mix."""
    labels = sorted(set(LABELS))
    total = np.array([LABELS.count(lab) for lab in labels], dtype=float) / len(LABELS)
    distances = []
    for hist in label_histogram(LABELS, parts):
        mix = np.array([hist.get(lab, 0) for lab in labels], dtype=float)
        distances.append(0.5 * np.abs(mix / mix.sum() - total).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = {a: np.mean([_skew(partition(LABELS, 4, "dirichlet", a, s)) for s in range(5)]) for a in (0.05, 1.0, 100.0)}
    iid = np.mean([_skew(partition(LABELS, 4, "iid", 0.0, s)) for s in range(5)])
    assert skews[0.05] > 0.4 > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.1 and iid < 0.05


def test_errors_and_registry():
    with pytest.raises(ValueError, match="cannot be split"):
        partition(["a"], 2, "iid", 0.0, 0)
    with pytest.raises(KeyError, match="unknown partitioner 'zipf'"):
        partition(LABELS, 2, "zipf", 0.0, 0)
    with pytest.raises(ValueError, match="already registered"):
        partitioners.register("iid")(lambda *a, **k: [])
    with pytest.raises(TypeError):
        partitioners.items["x"] = None  # read-only view
