"""Where a round's time goes, for the demo config (or another), run for real through the flow.

    .venv/bin/python bench/round_breakdown.py [--config configs/demo.yaml] [--rounds N]

Runs a fresh federation in a temporary data folder (the demo's own folder is left alone) and
prints, per round: seconds per stage, each client's training (its score of the global it
received, then its local steps: what it reports as `train_s`), the round's wall time from its
start to the next round's start (the last round's: to the run's end, which adds the final
adapter's logging and the last round's score), and the overhead, wall − slowest client's
training, as a share of the wall. A round's score runs beside the next round's training.
Target: at most 3% in the steady state (the rounds that are neither the first, which builds the
pooled models, nor the last).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlib_cli.common import embedded_defaults as _embedded_defaults  # noqa: E402

TARGET = 0.03  # steady-state overhead, as a share of the round's wall time

STAGES = [
    ("partition", "partition_s"),
    ("encrypt+upload", "encrypt_upload_s"),
    ("download+decrypt", "download_decrypt_s"),
    ("aggregate", "aggregate_s"),
    ("score (beside the next round)", "evaluate_s"),
    ("round_s (partition to committed)", "round_s"),
]


class _Timeline(logging.Handler):
    """When each progress event was emitted, by this process's clock."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        from fedlib.progress import RoundStarted

        event = getattr(record, "event", None)
        if isinstance(event, RoundStarted):
            self.started[event.round] = time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    _embedded_defaults(verbose=False)
    from rich.console import Console
    from rich.table import Table

    from flows.federated_training import federated_training

    timeline = _Timeline()
    progress = logging.getLogger("fedlib.progress")
    progress.setLevel(logging.INFO)
    progress.addHandler(timeline)
    raw = yaml.safe_load(args.config.read_text())
    with tempfile.TemporaryDirectory(prefix="fedlib-bench-") as tmp:
        raw.setdefault("federation", {})["data_dir"] = str(Path(tmp) / "data")
        if args.rounds:
            raw.setdefault("training", {})["rounds"] = args.rounds
        config_path = Path(tmp) / "bench.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        manifests = federated_training(str(config_path))
        ended = time.perf_counter()

    rounds = [m for m in manifests if m.round > 0]
    clients = sorted({c for m in rounds for c in m.clients})
    starts = [timeline.started[m.round] for m in rounds]
    walls = [end - start for start, end in zip(starts, [*starts[1:], ended], strict=True)]
    slowest = [m.timings["train_s"] for m in rounds]  # the round's slowest client report, as the flow recorded it
    shares = [(wall - train) / wall for wall, train in zip(walls, slowest, strict=True)]
    table = Table()
    table.add_column("seconds")
    for m in rounds:
        table.add_column(f"round {m.round}", justify="right")
    for label, key in STAGES:
        table.add_row(label, *(f"{m.timings[key]:.2f}" for m in rounds))
    for client in clients:
        table.add_row(f"{client} training", *(f"{m.clients[client].train_s:.2f}" if client in m.clients else "-" for m in rounds))
    table.add_row("slowest client's training", *(f"{t:.2f}" for t in slowest))
    table.add_row("round wall (start to next start)", *(f"{w:.2f}" for w in walls))
    table.add_row("overhead (wall − slowest)", *(f"{w - t:.2f}" for w, t in zip(walls, slowest, strict=True)))
    table.add_row("overhead share", *(f"{r:.1%}" for r in shares))
    for client in clients:
        table.add_row(f"bytes {client}", *(f"{m.clients[client].bytes_uploaded if client in m.clients else 0:,}" for m in rounds))
    table.add_row("perplexity", *(f"{m.perplexity:.2f}" for m in rounds))
    console = Console(width=140)
    console.print(f"round breakdown: {args.config.name} on {os.cpu_count()} CPU cores")
    console.print(table)
    steady = shares[1:-1]
    if steady:
        mean = sum(steady) / len(steady)
        verdict = "meets" if mean <= TARGET else "MISSES"
        console.print(
            f"base perplexity {manifests[0].perplexity:.2f}; steady-state overhead {mean:.1%} ({verdict} the {TARGET:.0%} target)"
        )
    else:
        console.print(f"base perplexity {manifests[0].perplexity:.2f}; no steady-state round (run 3 or more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
