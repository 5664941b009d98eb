"""What client-level DP costs in held-out perplexity, for the demo model and data.

    .venv/bin/python bench/dp_accuracy.py [--rounds 3] [--clip 0.5] [--noise 0.01 0.1]

Runs the demo federation (3 clients) without DP, then with DP-FedAvg at each noise multiplier z
(clip norm C), each in a fresh temporary folder, and prints perplexity by round, ε at
δ=1e-5 (opacus RDP accountant), and the clients' mean pre-clip update norm. With only 3 clients
the noise on the mean has std z·C/3 per coordinate, so strong privacy costs a lot: the table
shows how much.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from demo_runs import ROOT, demo_config, run_variant


def run(raw: dict, privacy: dict | None) -> list[dict]:
    return run_variant(raw, {"privacy": privacy} if privacy else {}, f"privacy {privacy}")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.1])
    args = parser.parse_args()
    raw = demo_config(args.config, rounds=args.rounds)

    rows = [("no DP", run(raw, None))]
    for z in args.noise:
        privacy = {"enabled": True, "clip_norm": args.clip, "noise_multiplier": z, "delta": 1e-5}
        rows.append((f"DP z={z} C={args.clip}", run(raw, privacy)))

    header = ["setting", *[f"ppl r{r}" for r in range(args.rounds + 1)], "ε (δ=1e-5)", "mean update norm"]
    print(" | ".join(header))
    for label, manifests in rows:
        norms = [c.update_norm for m in manifests[1:] for c in m.clients.values()]
        eps = manifests[-1].privacy.epsilon if manifests[-1].privacy else None
        cells = [label, *[f"{m.perplexity:.2f}" for m in manifests], f"{eps:.3g}" if eps else "-", f"{sum(norms) / len(norms):.3f}"]
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
