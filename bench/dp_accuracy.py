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
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import _embedded_defaults  # noqa: E402


def run(raw: dict, privacy: dict | None) -> list[dict]:
    from flows.federated_training import federated_training

    with tempfile.TemporaryDirectory(prefix="fedlib-dp-") as tmp:
        config = {**raw, "federation": {**raw.get("federation", {}), "data_dir": str(Path(tmp) / "data")}}
        if privacy:
            config["privacy"] = privacy
        path = Path(tmp) / "dp.yaml"
        path.write_text(yaml.safe_dump(config))
        return federated_training(str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.1])
    args = parser.parse_args()
    _embedded_defaults(verbose=False)
    raw = yaml.safe_load(args.config.read_text())
    raw.setdefault("training", {})["rounds"] = args.rounds

    rows = [("no DP", run(raw, None))]
    for z in args.noise:
        privacy = {"enabled": True, "clip_norm": args.clip, "noise_multiplier": z, "delta": 1e-5}
        rows.append((f"DP z={z} C={args.clip}", run(raw, privacy)))

    header = ["setting", *[f"ppl r{r}" for r in range(args.rounds + 1)], "ε (δ=1e-5)", "mean update norm"]
    print(" | ".join(header))
    for label, manifests in rows:
        norms = [c["update_norm"] for m in manifests[1:] for c in m["clients"].values()]
        eps = manifests[-1].get("epsilon")
        cells = [label, *[f"{m['perplexity']:.2f}" for m in manifests], f"{eps:.3g}" if eps else "-", f"{sum(norms) / len(norms):.3f}"]
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
