"""Aggregation time and peak memory against the number of clients, on a fixed adapter size.

    .venv/bin/python bench/scale.py [--clients 2 8 32 128] [--strategies fedavg median]

For each client count, writes that many sealed updates of the demo's adapter shape (460,800
fp32 parameters, random deltas) to a temporary file:// bucket, then aggregates them in a fresh
process through the real path (read, authenticate, decrypt, parse, check, strategy) and reports
the wall time and the peak resident memory above the process's baseline. FedAvg streams, so
its memory should stay flat; median holds every update, for contrast.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from secagg_overhead import demo_adapter_delta  # noqa: E402

from fedlib.config import parse_config  # noqa: E402
from tasks.from_config import aggregator_update_key, client_update_key, keyring, update_url  # noqa: E402


def _config(folder: Path, clients: int, strategy: str):
    return parse_config(
        {
            "federation": {"id": "scale", "data_dir": str(folder)},
            "aggregation": {"strategy": strategy, "max_update_bytes": 64 * 2**20},
            "clouds": [{"name": f"c{i:03d}"} for i in range(clients)],
        }
    )


def prepare(folder: Path, clients: int) -> None:
    from fedlib.wire import storage
    from fedlib.wire.envelope import EnvelopeContext, seal
    from fedlib.wire.serialization import tensors_to_bytes

    config = _config(folder, clients, "fedavg")
    ring = keyring(config, create=True)
    for i, cloud in enumerate(config.clouds):
        delta = demo_adapter_delta(i)
        payload = tensors_to_bytes(delta, metadata={"num_examples": str(100 + i), "local_steps": "10", "codecs": "[]"})
        blob = seal(payload, client_update_key(ring, cloud.name), EnvelopeContext("scale", 1, cloud.name))
        storage.write_atomic(update_url(config, cloud.name, 1), blob)


def worker(folder: Path, clients: int, strategy: str) -> dict:
    from tasks.from_config import aggregate, round_intake

    config = _config(folder, clients, strategy)
    ring = keyring(config)
    keys = {c.name: aggregator_update_key(ring, c.name) for c in config.clouds}
    global_adapter = {k: torch.zeros_like(v) for k, v in demo_adapter_delta(0).items()}
    sampler = RssSampler()
    started = time.perf_counter()
    with sampler:
        _, report = aggregate(config, round_intake(config, 1, [c.name for c in config.clouds], keys, global_adapter), global_adapter)
    seconds = time.perf_counter() - started
    assert len(report.accepted) == clients
    return {"seconds": seconds, "baseline_mb": sampler.baseline_mb, "peak_mb": sampler.peak_mb}


class RssSampler:
    """Resident memory read from /proc every 2 ms while the block runs: the peak above the
    resident size at its start (the process's own high-water mark would include imports)."""

    def __init__(self) -> None:
        self.baseline_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._page_mb = resource.getpagesize() / 2**20

    def _rss_mb(self) -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self._page_mb

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> RssSampler:
        self.baseline_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "median"])
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "CLIENTS", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, clients, strategy = args.worker
        print(json.dumps(worker(Path(folder), int(clients), strategy)))
        return 0

    print("| strategy | clients | aggregate s | s per client | peak RSS above baseline (MB) |")
    print("|---|---|---|---|---|")
    for strategy in args.strategies:
        for clients in args.clients:
            with tempfile.TemporaryDirectory(prefix="fedlib-scale-") as tmp:
                prepare(Path(tmp), clients)
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", tmp, str(clients), strategy], capture_output=True, text=True, check=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {strategy} | {clients} | {r['seconds']:.2f} | {r['seconds'] / clients * 1000:.1f} ms | "
                f"{r['peak_mb'] - r['baseline_mb']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
