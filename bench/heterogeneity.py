"""Three clouds at 1×, 2× and 4× speed: round time, perplexity and cost, with equal local
steps, with step budgets fitted to a deadline, and with a deadline alone.

    .venv/bin/python bench/heterogeneity.py [--rounds 2] [--steps 8] [--deadline 60]

One machine plays the three clouds (`training.emulate_speed` with `seconds_per_step`: each step
of a cloud at speed s takes at least step_seconds / s; the default 16 s keeps even the 4× cloud's
4 s above a native step on 2 shared cores). The prices are illustrative
profile values, not quotes. Budgeted runs average with step normalisation (FedNova), so the
fast cloud's extra steps do not bias the mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from demo_runs import ROOT, demo_config, run_variant

sys.path.insert(0, str(ROOT))
from fedlib.round.planning import DEADLINE_SHARE  # noqa: E402

PROFILES = {
    "aws": {"speed": 1.0, "price_per_hour": 1.20, "egress_per_gb": 0.09},
    "gcp": {"speed": 2.0, "price_per_hour": 2.50, "egress_per_gb": 0.12},
    "azure": {"speed": 4.0, "price_per_hour": 5.00, "egress_per_gb": 0.087},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=16.0, help="one step at speed 1 (above the native step time)")
    parser.add_argument("--deadline", type=float, help="seconds; default: what the 2× cloud needs for the equal steps")
    args = parser.parse_args()
    base = demo_config(rounds=args.rounds, steps=args.steps)
    base["clouds"] = [{**cloud, "profile": PROFILES[cloud["name"]]} for cloud in base["clouds"]]
    base["training"]["emulate_speed"] = True
    base["aggregation"]["min_clients"] = 1  # a round with stragglers still counts here
    per_step = args.step_seconds
    base["training"]["seconds_per_step"] = per_step  # each step takes at least this ÷ speed
    # By default the deadline is what the 2× cloud needs for the equal steps, so the 1× cloud cannot make it.
    deadline = args.deadline or round(per_step / 2 * args.steps / DEADLINE_SHARE)
    budgeted = {
        "training": {"step_budget": "deadline"},
        "orchestration": {"round_deadline_s": deadline},
        "aggregation": {"normalize_steps": True},
    }
    rows = []
    for label, overrides in [
        ("equal steps", {}),
        ("budgeted steps + FedNova", budgeted),
        ("equal steps + deadline", {"orchestration": {"round_deadline_s": deadline}}),
    ]:
        manifests, wall = run_variant(base, overrides, label)
        rows.append((label, manifests[1:], wall))

    print(
        f"demo on one machine playing 3 clouds at speeds 1×/2×/4×; {args.rounds} rounds × {args.steps} steps; "
        f"{per_step:g} s per step at 1×; deadline {deadline:g} s"
    )
    print(
        "| setting | round wall s (median) | steps aws/gcp/azure by round | stragglers | perplexity by round | cost per round (aws/gcp/azure) |"
    )
    print("|---|---|---|---|---|---|")
    for label, trained, _ in rows:
        walls = statistics.median(m.timings["round_s"] for m in trained)
        steps = "; ".join("/".join(str(m.step_budgets.get(c, "-")) for c in PROFILES) for m in trained)
        stragglers = sum(len(m.stragglers) for m in trained)
        curve = " → ".join(f"{m.perplexity:.2f}" for m in trained)
        cost = "; ".join("/".join(f"${m.cost.get(c, 0):.4f}" for c in PROFILES) for m in trained)
        print(f"| {label} | {walls:.0f} | {steps} | {stragglers} | {curve} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
