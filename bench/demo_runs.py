"""Run the demo federation with config overrides, each in a fresh temporary folder, for the
benchmarks that compare settings on the real model and data."""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlib_cli.common import embedded_defaults as _embedded_defaults  # noqa: E402


def demo_config(path: Path | None = None, rounds: int | None = None, steps: int | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((path or ROOT / "configs" / "demo.yaml").read_text())
    if rounds is not None:
        raw.setdefault("training", {})["rounds"] = rounds
    if steps is not None:
        raw.setdefault("training", {})["local_steps"] = steps
    return raw


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` replace sections key by key (one level deep; `clouds` as a whole)."""
    out = copy.deepcopy(base)
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **value}
        else:
            out[section] = copy.deepcopy(value)
    return out


def run_variant(base: dict[str, Any], overrides: dict[str, Any], label: str) -> tuple[list[dict], float]:
    """The committed manifests (round 0 first) and the wall time of one federation run."""
    from flows.federated_training import federated_training

    _embedded_defaults(verbose=False)
    with tempfile.TemporaryDirectory(prefix="fedlib-bench-") as tmp:
        raw = merged(base, overrides)
        raw["federation"] = {**raw.get("federation", {}), "data_dir": str(Path(tmp) / "data")}
        path = Path(tmp) / "federation.yaml"
        path.write_text(yaml.safe_dump(raw))
        print(f"… {label}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        manifests = federated_training(str(path))
        return manifests, time.perf_counter() - started
