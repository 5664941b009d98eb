"""Round wall time on shaped links: what compression saves in seconds, not only in bytes.

    .venv/bin/python bench/shaped_links.py [--schemes fp32 int2+down] [--seeds 0 1] [--steps 10]

Needs root (network namespaces and `tc`, as the separate-hosts drill). Each cloud's object store
is a host of its own (`scripts/hosts.py`) behind a token-bucket link of that cloud's rate, as in
the drill (aws 20, gcp 30, azure 10 Mbit/s up, 4× that down), and so is the aggregator's
checkpoint store (100 Mbit/s). The federation runs embedded on the operator's host, so each
client's update, the aggregator's reads of it, and each client's read of the global (the full
adapter, or the compressed broadcast) cross a shaped link. `int2+down` is the recommended scheme
(bench/compression.py: within 1% of fp32's perplexity on every schedule, 17–19× fewer bytes).

Runs the demo federation once per scheme and seed, the schemes alternating first per seed; each
run is appended to `.bench/shaped_links.jsonl` as it ends, and a second call with the same
arguments runs only what is missing. Prints per run the round walls (partition to commit), then
the mean round wall per scheme and what the scheme saves against fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compression import SCHEMES  # noqa: E402
from bench.demo_runs import demo_config, run_variant  # noqa: E402
from scripts.hosts import Network, wait_for_port  # noqa: E402

UP_MBIT = {"aws": 20, "gcp": 30, "azure": 10, "checkpoints": 100}
PORT, INNER = 9000, 9001
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
RESULTS = ROOT / ".bench" / "shaped_links.jsonl"


@dataclass(frozen=True)
class Run:
    scheme: str
    seed: int
    steps: int
    round_walls: list[float]  # each round's partition-to-commit seconds
    up: float  # bytes per client per round
    down: float
    perplexity: float
    wall_s: float


class ShapedStores:
    """The three clouds' stores and the checkpoint store, each a host behind its link."""

    def __init__(self) -> None:
        self.net = Network(prefix="fb", subnet="10.78.0").open()
        self.processes: list[subprocess.Popen] = []
        self.logs = Path(tempfile.mkdtemp(prefix="fedlib-shaped-"))

    def start(self) -> dict[str, str]:
        operator = self.net.add("operator", root=True)
        hosts = {name: self.net.add(name) for name in UP_MBIT}
        self.net.allow(operator, *hosts.values())
        for name, host in hosts.items():
            # The store's side of the link: what a client sends arrives at the cloud's uplink rate.
            self.net.shape(host, 4 * UP_MBIT[name], UP_MBIT[name])
        bin_dir = Path(sys.executable).parent
        for name in ("aws", "checkpoints"):
            host = hosts[name]
            self.processes.append(
                host.spawn(str(bin_dir / "moto_server"), "-H", host.address, "-p", str(PORT), log=self.logs / f"{name}.log")
            )
        gcs = hosts["gcp"]
        self.processes.append(
            gcs.spawn(
                str(bin_dir / "gcp-storage-emulator"),
                "start",
                "--host",
                gcs.address,
                "--port",
                str(PORT),
                "--in-memory",
                log=self.logs / "gcp.log",
            )
        )
        blob = hosts["azure"]
        azurite = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
        (self.logs / "azurite").mkdir()
        flags = ["--location", str(self.logs / "azurite"), "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose"]
        self.processes.append(
            blob.spawn(str(azurite), "--blobHost", blob.address, "--blobPort", str(PORT), *flags, log=self.logs / "azure.log")
        )
        for host in hosts.values():
            wait_for_port(host.address, PORT, what=host.name)
        return {name: host.url(PORT) for name, host in hosts.items()}

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        self.net.close()


def overrides(urls: dict[str, str], seed: int, steps: int, scheme: str) -> dict:
    # Each run its own prefix in every store: runs share the stores, and each starts at round 0
    # with keys of its own (a shard or lineage left by another run is sealed for other keys).
    run = f"{scheme.replace('+', '-')}-seed-{seed}-steps-{steps}"
    clouds = [
        {"name": "aws", "provider": "aws", "storage": f"s3://bench-aws/{run}", "storage_options": {"endpoint_url": urls["aws"]}},
        {
            "name": "gcp",
            "provider": "gcp",
            "storage": f"gs://bench-gcp/{run}",
            "storage_options": {"endpoint_url": urls["gcp"], "token": "anon"},
        },
        {"name": "azure", "provider": "azure", "storage": f"az://bench-azure/{run}"},
    ]
    checkpoints = f"s3://bench-checkpoints/{run}"
    federation = {"seed": seed, "checkpoints": checkpoints, "checkpoint_options": {"endpoint_url": urls["checkpoints"]}}
    out = {"federation": federation, "training": {"local_steps": steps}, "clouds": clouds}
    for section, value in SCHEMES[scheme].items():
        out[section] = {**out.get(section, {}), **value}
    return out


def run_one(urls: dict[str, str], scheme: str, seed: int, steps: int) -> Run:
    base = demo_config()
    manifests, wall = run_variant(base, overrides(urls, seed, steps, scheme), f"{scheme} · seed {seed} · shaped links")
    clients = [report for m in manifests[1:] for report in m.clients.values()]
    return Run(
        scheme,
        seed,
        steps,
        round_walls=[round(m.timings["round_s"], 2) for m in manifests[1:]],
        up=statistics.fmean(r.bytes_uploaded for r in clients),
        down=statistics.fmean(r.bytes_downloaded for r in clients),
        perplexity=manifests[-1].perplexity,
        wall_s=round(wall, 1),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["fp32", "int2+down"], choices=sorted(SCHEMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=10, help="local steps per round (the demo's 10)")
    args = parser.parse_args()
    import os

    if os.geteuid() != 0:
        print("bench/shaped_links.py: needs root (network namespaces and tc); run it as root, as CI runs the drill", file=sys.stderr)
        return 2
    RESULTS.parent.mkdir(exist_ok=True)
    done = [Run(**json.loads(line)) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    stores = ShapedStores()
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )
    try:
        urls = stores.start()
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = (
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};BlobEndpoint={urls['azure']}/devstoreaccount1;"
        )
        for i, seed in enumerate(args.seeds):
            order = args.schemes if i % 2 == 0 else args.schemes[::-1]
            for scheme in order:
                if any(r.scheme == scheme and r.seed == seed and r.steps == args.steps for r in done):
                    continue
                run = run_one(urls, scheme, seed, args.steps)
                done.append(run)
                with RESULTS.open("a") as out:
                    out.write(json.dumps(asdict(run)) + "\n")
                walls = ", ".join(f"{w:.1f}" for w in run.round_walls)
                print(
                    f"{scheme} seed {seed}: rounds {walls} s; {run.up:,.0f} B up, {run.down:,.0f} B down per client and round; "
                    f"perplexity {run.perplexity:.2f}; run {run.wall_s:.0f} s",
                    flush=True,
                )
    finally:
        stores.close()
    print_table([r for r in done if r.steps == args.steps and r.scheme in args.schemes and r.seed in args.seeds], args.schemes)
    return 0


def print_table(runs: list[Run], schemes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"round wall on shaped links (aws {UP_MBIT['aws']}, gcp {UP_MBIT['gcp']}, azure {UP_MBIT['azure']} Mbit/s up)")
    for column in ("scheme", "seeds", "mean round wall s", "up B/client/round", "down B/client/round", "final perplexity", "saves vs fp32"):
        table.add_column(column)
    reference = [w for r in runs if r.scheme == "fp32" for w in r.round_walls]
    for scheme in schemes:
        mine = [r for r in runs if r.scheme == scheme]
        if not mine:
            continue
        walls = [w for r in mine for w in r.round_walls]
        mean = statistics.fmean(walls)
        saves = f"{statistics.fmean(reference) - mean:+.1f} s/round" if reference and scheme != "fp32" else "-"
        table.add_row(
            scheme,
            ",".join(str(r.seed) for r in mine),
            f"{mean:.1f}",
            f"{statistics.fmean(r.up for r in mine):,.0f}",
            f"{statistics.fmean(r.down for r in mine):,.0f}",
            f"{statistics.fmean(r.perplexity for r in mine):.2f}",
            saves,
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
