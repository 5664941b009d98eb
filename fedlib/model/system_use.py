"""What a client's training cost its machine, measured by the client and reported inside its
sealed update (the aggregator logs it to the round's MLflow run: clients need no tracking
credentials). Process-wide numbers: with several clients as threads of one process (the
embedded demo) they describe the process, not one client."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class SystemUse:
    peak_memory_mib: float = 0.0
    gpu_memory_mib: float = 0.0
    cpu_util: float = 0.0


@contextlib.contextmanager
def measured() -> Iterator[SystemUse]:
    use = SystemUse()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    yield use
    use.cpu_util = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
    use.peak_memory_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if cuda:
        use.gpu_memory_mib = torch.cuda.max_memory_allocated() / 2**20
