"""Where a round's time goes, for the demo config (or another), run for real through the flow.

    .venv/bin/python bench/round_breakdown.py [--config configs/demo.yaml] [--rounds N]

Runs a fresh federation in a temporary data folder (the demo's own folder is left alone) and
prints, per round: seconds per stage, bytes per client, and the overhead ratio
(round wall time − slowest client's train time) / round wall time. Target: under 10%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlib_cli.common import embedded_defaults as _embedded_defaults  # noqa: E402

STAGES = [
    ("partition", "partition_s"),
    ("train (slowest)", "train_s"),
    ("encrypt+upload", "encrypt_upload_s"),
    ("download+decrypt", "download_decrypt_s"),
    ("aggregate", "aggregate_s"),
    ("evaluate", "evaluate_s"),
    ("round wall", "round_s"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    _embedded_defaults(verbose=False)
    from rich.console import Console
    from rich.table import Table

    from flows.federated_training import federated_training

    raw = yaml.safe_load(args.config.read_text())
    with tempfile.TemporaryDirectory(prefix="fedlib-bench-") as tmp:
        raw.setdefault("federation", {})["data_dir"] = str(Path(tmp) / "data")
        if args.rounds:
            raw.setdefault("training", {})["rounds"] = args.rounds
        config_path = Path(tmp) / "bench.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        manifests = federated_training(str(config_path))

    rounds = [m for m in manifests if m.round > 0]
    clients = sorted({c for m in rounds for c in m.clients})
    table = Table()
    table.add_column("stage")
    for m in rounds:
        table.add_column(f"round {m.round}", justify="right")
    for label, key in STAGES:
        table.add_row(label, *(f"{m.timings[key]:.2f}" for m in rounds))
    for client in clients:
        table.add_row(f"bytes {client}", *(f"{m.clients[client].bytes_uploaded if client in m.clients else 0:,}" for m in rounds))
    ratios = [(m.timings["round_s"] - m.timings["train_s"]) / m.timings["round_s"] for m in rounds]
    table.add_row("overhead ratio", *(f"{r:.1%}" for r in ratios))
    table.add_row("perplexity", *(f"{m.perplexity:.2f}" for m in rounds))
    console = Console(width=120)
    console.print(f"round breakdown: {args.config.name} on {os.cpu_count()} CPU cores (seconds, bytes)")
    console.print(table)
    mean = sum(ratios) / len(ratios)
    verdict = "meets" if mean < 0.10 else "MISSES"
    console.print(f"base perplexity {manifests[0].perplexity:.2f}; mean overhead {mean:.1%} ({verdict} the 10% target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
