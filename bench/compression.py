"""Bytes per client per round against final perplexity, for each update codec, on the demo.

    .venv/bin/python bench/compression.py [--rounds 3] [--steps 10] [--fractions 0.1 0.03]

Runs the demo federation (SmolLM2-135M, LoRA r=8, 3 clouds) once per codec chain, each in a
fresh folder, and prints the mean encrypted bytes a client uploads per round, the ratio to
fp32 LoRA and to full-model FedAvg (every base weight in fp32), and the held-out perplexity
after the last round. Top-k runs use int8 values and zstd, with error feedback unless marked.
"""

from __future__ import annotations

import argparse
import sys

from demo_runs import demo_config, run_variant


def full_model_bytes(source: str) -> int:
    from fedlib.model import load_base_model

    return sum(p.numel() * p.element_size() for p in load_base_model(source).parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.03])
    args = parser.parse_args()
    base = demo_config(rounds=args.rounds, steps=args.steps)
    variants: list[tuple[str, dict]] = [
        ("fp32 (no codec)", {"codecs": []}),
        ("fp16", {"codecs": ["fp16"]}),
        ("int8", {"codecs": ["int8"]}),
    ]
    for f in args.fractions:
        variants.append((f"top-{f:g} + int8 + zstd, EF", {"codecs": ["topk", "int8", "zstd"], "topk_fraction": f}))
    smallest = min(args.fractions)
    variants.append(
        (f"top-{smallest:g} + int8 + zstd, no EF", {"codecs": ["topk", "int8", "zstd"], "topk_fraction": smallest, "error_feedback": False})
    )

    results = []
    for label, compression in variants:
        manifests, wall = run_variant(base, {"compression": compression}, label)
        sizes = [c.bytes_uploaded for m in manifests[1:] for c in m.clients.values()]
        results.append((label, sum(sizes) / len(sizes), manifests[-1].perplexity, [m.perplexity for m in manifests], wall))

    full = full_model_bytes(base["model"]["source"])
    fp32_bytes, fp32_ppl = results[0][1], results[0][2]
    print(f"demo: {len(base['clouds'])} clouds, {args.rounds} rounds × {args.steps} local steps; full model fp32 = {full:,} bytes")
    print("| codec | bytes/client/round | × fewer than fp32 LoRA | × fewer than full model | perplexity by round | final vs fp32 | wall |")
    print("|---|---|---|---|---|---|---|")
    for label, size, ppl, curve, wall in results:
        print(
            f"| {label} | {size:,.0f} | {fp32_bytes / size:.1f} | {full / size:,.0f} | "
            f"{' → '.join(f'{p:.2f}' for p in curve)} | {100 * (ppl / fp32_ppl - 1):+.2f}% | {wall:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
