"""Deterministic splits of training blocks over clients.

IID is a shuffled even split. Non-IID follows the usual Dirichlet label-skew recipe (Hsu et al.,
2019): for every label (a genre or a document) draw client shares from Dir(alpha), so a small
alpha gives each client a few labels and a large one approaches IID.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from fedlib.registry import Registry

Assignment = list[list[int]]  # Assignment[client] = sorted block indices

partitioners: Registry = Registry("partitioner")


@partitioners.register("iid")
def partition_iid(labels: Sequence[str], n_clients: int, rng: np.random.Generator, alpha: float = 0.0) -> Assignment:
    del alpha  # IID ignores the concentration; the signature is shared with dirichlet.
    _check(len(labels), n_clients)
    order = rng.permutation(len(labels))
    return [sorted(part.tolist()) for part in np.array_split(order, n_clients)]


@partitioners.register("dirichlet")
def partition_dirichlet(
    labels: Sequence[str], n_clients: int, rng: np.random.Generator, alpha: float = 0.5, max_tries: int = 100
) -> Assignment:
    _check(len(labels), n_clients)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    for _ in range(max_tries):
        parts: Assignment = [[] for _ in range(n_clients)]
        for label in sorted(by_label):
            members = np.asarray(by_label[label])[rng.permutation(len(by_label[label]))]
            shares = rng.dirichlet([alpha] * n_clients)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if all(parts):  # a client with no data cannot train; redraw rather than hand it nothing
            return [sorted(p) for p in parts]
    raise ValueError(f"dirichlet alpha={alpha} left a client empty in {max_tries} draws; raise alpha")


def partition(labels: Sequence[str], n_clients: int, kind: str, alpha: float, seed: int) -> Assignment:
    """The seed alone fixes the split, so every run (and every resumed run) agrees on it."""
    return partitioners.get(kind)(labels, n_clients, np.random.default_rng(seed), alpha=alpha)


def label_histogram(labels: Sequence[str], assignment: Assignment) -> list[dict[str, int]]:
    """Per-client label counts: how skewed a split is, for logs and tests."""
    return [dict(Counter(labels[i] for i in part)) for part in assignment]


def _check(n_items: int, n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError("need at least one client")
    if n_items < n_clients:
        raise ValueError(f"{n_items} blocks cannot be split over {n_clients} clients")
