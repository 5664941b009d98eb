"""How many CPU threads one trainer or scorer uses, when several share a process.

torch's intra-op team is sized per calling thread (OpenMP's `nthreads` is a per-thread
setting; `torch.set_num_threads` sets the caller's). Clients that train at once as threads of
one process (`orchestration.dispatch: local`) would otherwise each run a team as wide as the
machine: k trainers, k × cores threads on the cores, spinning at every barrier. Measured on the
demo (3 clients, 2 cores, 2026-12-03): 67–70 s per round with a full team each, 60–65 s with one
thread each, as fast as three single-threaded processes (60–63 s). So each client gets its
share of the cores, and the aggregator's scoring, which runs alone, gets them all back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PROCESS_THREADS = torch.get_num_threads()  # torch's default for this machine, read before anyone changes it


def thread_share(concurrent: int, budget: int | None = None) -> int:
    """Each of `concurrent` trainers' threads out of `budget` (torch's default when unset)."""
    return max(1, (budget or PROCESS_THREADS) // max(1, concurrent))


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """This thread's torch team is `threads` wide inside the block (unchanged for None), and
    what it was after it: a task runner's worker thread is reused by the next task."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
