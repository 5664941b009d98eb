"""The demo as a user runs it (`fedlib run configs/demo.yaml`), at two commits, alternately, on
this machine: does a change make what users run today slower?

    .venv/bin/python bench/before_after.py --before 6dfc021 --pairs 2

Each commit runs from its own `git worktree` with this checkout's `.venv` (its packages; the
code is the worktree's own, first on `sys.path`), in a fresh data folder, with the converted
model shared (`FEDLIB_CACHE`). Runs alternate (before, after, before, after, ...) so that a
machine that slows down or speeds up over time weighs on both alike, and each pair swaps which
goes first (before-after, then after-before, ...), so that neither always runs on the caches the
other warmed. Prints one row per run and the medians; `--out` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"


def worktree(rev: str, where: Path) -> Path:
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True, capture_output=True)
    return where


def run_demo(code: Path, cache: Path) -> float:
    """Seconds of one `fedlib run configs/demo.yaml` from `code`, in a fresh data folder."""
    with tempfile.TemporaryDirectory(prefix="fedlib-before-after-") as tmp:
        env = {**os.environ, "FEDLIB_CACHE": str(cache), "PREFECT_HOME": str(Path(tmp) / "prefect"), "PYTHONPATH": str(code)}
        command = [str(PYTHON), "-m", "fedlib_cli", "run", "configs/demo.yaml", "--set", f"federation.data_dir={tmp}/data"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the demo failed at {code}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--after", default="HEAD", help="the commit under test (default HEAD)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.gettempdir()) / "fedlib-before-after"
    cache = ROOT / ".fedlib" / "test-cache"
    trees = {label: worktree(rev, work / label) for label, rev in (("before", args.before), ("after", args.after))}
    revs = {
        label: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
        for label, tree in trees.items()
    }
    rows = []
    for pair in range(args.pairs):
        for label in ("before", "after") if pair % 2 == 0 else ("after", "before"):
            seconds = run_demo(trees[label], cache)
            rows.append({"pair": pair + 1, "run": label, "commit": revs[label], "seconds": round(seconds, 1)})
            print(f"pair {pair + 1}  {label:6}  {revs[label]}  {seconds:7.1f} s", flush=True)
    medians = {label: statistics.median(r["seconds"] for r in rows if r["run"] == label) for label in ("before", "after")}
    print("\n| run | commit | median s | runs |\n|---|---|---|---|")
    for label in ("before", "after"):
        print(f"| {label} | {revs[label]} | {medians[label]:.1f} | {sum(r['run'] == label for r in rows)} |")
    print(f"\nafter / before: {medians['after'] / medians['before']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
