"""What secure aggregation costs per round on the demo's adapter (SmolLM2-135M, LoRA r=8 on
q_proj and v_proj: 460,800 parameters), for several client counts.

    .venv/bin/python bench/secagg_overhead.py [--clients 3 8 16] [--repeat 3]

Runs the protocol's real functions in one process: every client's setup, masking and reveal,
and the aggregator's masked sum and unmasking, with no dropout and with one client dropped
after masking. Prints milliseconds (best of N) and the bytes a client uploads with and without
masking. Training and storage are left out: they cost the same either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlib.secagg.fixedpoint import encode, to_wire  # noqa: E402
from fedlib.secagg.masking import add_masked  # noqa: E402
from fedlib.secagg.protocol import Session, make_reveal, make_setup, mask_update, open_inbox, relay_setups, unmask_sum  # noqa: E402
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, seal  # noqa: E402
from fedlib.wire.keys import init_keys, load_keyring  # noqa: E402
from fedlib.wire.sealed_stores import RevealLedger  # noqa: E402
from fedlib.wire.serialization import tensors_to_bytes  # noqa: E402
from tasks.from_config import aggregator_update_key, client_update_key  # noqa: E402

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8


def streamed_sum(updates) -> dict[str, torch.Tensor]:
    """The aggregator's ring sum, one update at a time (`add_masked`), as `sum_masked_updates` runs it."""
    total: dict[str, torch.Tensor] = {}
    for update in updates:
        if not total:
            total = {name: torch.zeros(value.shape, dtype=torch.int64) for name, value in update.items()}
        add_masked(total, update)
    return total


def demo_adapter_delta(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.self_attn"
        shapes[f"{prefix}.q_proj.lora_A.weight"] = (RANK, HIDDEN)
        shapes[f"{prefix}.q_proj.lora_B.weight"] = (HIDDEN, RANK)
        shapes[f"{prefix}.v_proj.lora_A.weight"] = (RANK, HIDDEN)
        shapes[f"{prefix}.v_proj.lora_B.weight"] = (KV, RANK)
    return {name: torch.randn(shape, generator=gen) * 1e-3 for name, shape in shapes.items()}


def best_ms(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3, result


def measure(n: int, repeat: int, folder: Path) -> dict[str, float]:
    clients = [f"c{i:02d}" for i in range(n)]
    init_keys(folder, clients)
    ring = load_keyring(folder, clients)
    session = Session("bench", 1, os.urandom(8).hex(), tuple(clients), threshold=n // 2 + 1)
    deltas = {c: demo_adapter_delta(i) for i, c in enumerate(clients)}
    row: dict[str, float] = {}

    row["setup"], setups = best_ms(lambda: {c: make_setup(ring, c, session) for c in clients}, repeat)
    inboxes = relay_setups(setups)
    peers = {c: open_inbox(ring, c, session, inboxes[c]) for c in clients}

    def mask_all():
        return {c: to_wire(mask_update(ring, c, session, peers[c], encode(deltas[c], 24, n))) for c in clients}

    row["mask"], wire = best_ms(mask_all, repeat)
    key = UpdateKey(os.urandom(32), "bench")
    masked_bytes = len(seal(tensors_to_bytes(wire[clients[0]]), key, EnvelopeContext("bench", 1, clients[0])))
    plain_bytes = len(seal(tensors_to_bytes(deltas[clients[0]]), key, EnvelopeContext("bench", 1, clients[0])))
    residues = {c: {k: v.to(torch.int64) % (1 << 32) for k, v in wire[c].items()} for c in clients}
    publics = {c: s.mask_public for c, s in setups.items()}
    keys = {c: aggregator_update_key(ring, c) for c in clients}

    for label, dropped in (("no drop", []), ("1 dropped", [clients[-1]])):
        survivors = [c for c in clients if c not in dropped]
        row[f"sum {label}"], total = best_ms(lambda: streamed_sum(residues[c] for c in survivors), repeat)

        def ledger(client: str) -> RevealLedger:  # one per case: a client answers one reveal per session
            key = UpdateKey(ring.client_derived_secret(client, "secagg-reveals"), "bench")
            return RevealLedger((folder / "ledgers" / label / client).as_uri(), key, "bench", client)

        def reveal_all():
            return {
                c: make_reveal(ring, c, session, peers[c], survivors, dropped, client_update_key(ring, c), ledger(c)) for c in survivors
            }

        row[f"reveal {label}"], reveals = best_ms(reveal_all, repeat)
        row[f"unmask {label}"], _ = best_ms(lambda: unmask_sum(total, session, publics, survivors, dropped, reveals, keys), repeat)
    row["masked bytes"], row["plain bytes"] = masked_bytes, plain_bytes
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 8, 16])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"demo adapter: {LAYERS * (RANK * HIDDEN * 3 + KV * RANK):,} parameters; best of {args.repeat}; {os.cpu_count()} CPU cores")
    header = (
        "clients",
        "setup/client",
        "mask/client",
        "sum",
        "reveal/client",
        "unmask",
        "unmask, 1 dropped",
        "bytes masked",
        "bytes plain",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for n in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(n, args.repeat, Path(tmp))
        print(
            f"{n} | {r['setup'] / n:.1f} ms | {r['mask'] / n:.1f} ms | {r['sum no drop']:.1f} ms | "
            f"{r['reveal no drop'] / n:.1f} ms | {r['unmask no drop']:.1f} ms | {r['unmask 1 dropped']:.1f} ms | "
            f"{int(r['masked bytes']):,} | {int(r['plain bytes']):,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
