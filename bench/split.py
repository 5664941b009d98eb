"""Split against unsplit fine-tuning on the demo model: step time and bytes per step for two cut
points, and the held-out perplexity a short split run reaches.

    .venv/bin/python bench/split.py [--cuts 2 15] [--steps 5] [--train-steps 20]

Unsplit: LoRA steps on the whole model in one process. Split: the server's middle blocks in
their own process on 127.0.0.1, the client's slices here, every activation and gradient sealed
(AES-256-GCM) and sent over HTTP. Both use the demo's batch (4 × 128 tokens) and LoRA (r=8 on
q_proj and v_proj); split adds SPF on down_proj. The perplexity run is the `split-finetune`
flow itself (one client, cut at the first value of --cuts).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from demo_runs import demo_config, merged

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlib_cli.common import embedded_defaults as _embedded_defaults  # noqa: E402


def unsplit_steps(config, batches) -> list[float]:
    from fedlib.model.training import train_lora
    from tasks.from_config import load_global_model

    model = load_global_model(config, None)
    times = []
    for batch in batches:
        started = time.perf_counter()
        train_lora(model, batch, 1, len(batch), config.training.learning_rate, torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - started)
    return times


def split_steps(config, config_path: str, batches) -> tuple[list[float], list[int]]:
    from tasks.from_config import keyring
    from tasks.split import connect_client, start_server

    keyring(config, create=True)
    server = start_server(config_path, 600)
    try:
        worker = connect_client(config, config.clouds[0].name, server.url)
        worker.calibrate(batches[:1])
        stats = [worker.train_step(b) for b in batches]
        return [s.seconds for s in stats], [s.bytes for s in stats]
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=[2, 15])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    _embedded_defaults(verbose=False)
    from fedlib.config import load_config
    from tasks.from_config import load_data

    with tempfile.TemporaryDirectory(prefix="fedlib-split-bench-") as tmp:
        base = demo_config()
        base["federation"]["data_dir"] = str(Path(tmp) / "data")
        base["clouds"] = base["clouds"][:1]
        base["aggregation"]["min_clients"] = 1
        rows = []
        config = None
        for cut in args.cuts:
            path = Path(tmp) / f"split-{cut}.yaml"
            path.write_text(yaml.safe_dump(merged(base, {"split": {"cut": cut}})))
            config = load_config(path)
            blocks = load_data(config).train.tokens
            batches = [blocks[i * 4 : i * 4 + 4] for i in range(args.steps)]
            seconds, sizes = split_steps(config, str(path), batches)
            rows.append((f"split, cut {cut} (client: embeddings + {cut} blocks + head)", seconds, statistics.mean(sizes)))
        rows.insert(0, ("unsplit (one process)", unsplit_steps(config, batches), 0))

        path = Path(tmp) / "split-run.yaml"
        path.write_text(yaml.safe_dump(merged(base, {"split": {"cut": args.cuts[0], "steps": args.train_steps, "rounds": 1}})))
        from flows.split_finetune import split_finetune

        run = split_finetune(str(path))

    print(f"demo model, batch 4×128 tokens, {args.steps} steps each (median)")
    print("| setting | step s | × unsplit | bytes per step (sealed, both ways) |")
    print("|---|---|---|---|")
    base_s = statistics.median(rows[0][1])
    for label, seconds, size in rows:
        print(f"| {label} | {statistics.median(seconds):.2f} | {statistics.median(seconds) / base_s:.2f} | {size:,.0f} |")
    print(
        f"\nsplit-finetune flow, cut {args.cuts[0]}, {args.train_steps} steps: held-out perplexity "
        f"{run['perplexity_before']:.2f} → {run['rounds'][-1]['perplexity']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
