"""Encryption and decryption throughput of the update envelope, next to a plain memory copy.

    .venv/bin/python bench/crypto_throughput.py [--mib 64] [--repeat 5]

Times `seal` and `open_sealed` (HKDF + AES-256-GCM + header) and safetensors (de)serialisation
on the same buffer, best of N, and prints MB/s. A copy of the buffer is the floor any
envelope must pay.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed, seal  # noqa: E402
from fedlib.wire.serialization import bytes_to_tensors, tensors_to_bytes  # noqa: E402


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.mib * 2**20
    data = os.urandom(size)
    key, ctx = UpdateKey(os.urandom(32), "bench"), EnvelopeContext("bench", 1, "aws")
    blob = seal(data, key, ctx)
    assert open_sealed(blob, key, ctx) == data
    tensors = {"delta": torch.randn(size // 4)}
    payload = tensors_to_bytes(tensors)

    rows = [
        ("memory copy (bytearray)", lambda: bytearray(data)),
        ("seal: HKDF + AES-256-GCM encrypt", lambda: seal(data, key, ctx)),
        ("open: checks + AES-256-GCM decrypt", lambda: open_sealed(blob, key, ctx)),
        ("safetensors serialise", lambda: tensors_to_bytes(tensors)),
        ("safetensors parse", lambda: bytes_to_tensors(payload)),
    ]
    print(f"{args.mib} MiB buffer, best of {args.repeat}, {os.cpu_count()} CPU cores")
    print(f"{'operation':40} {'seconds':>9} {'MB/s':>9} {'× copy':>7}")
    copy_rate = None
    for name, fn in rows:
        seconds = best_seconds(fn, args.repeat)
        rate = size / seconds / 1e6
        copy_rate = copy_rate or rate
        print(f"{name:40} {seconds:9.4f} {rate:9.0f} {rate / copy_rate:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
