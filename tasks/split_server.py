"""The split server's process, started beside the split flow, or on its own in a TEE:

    python -m tasks.split_server CONFIG --port PORT [--ready FILE]
    python -m tasks.split_server CONFIG --host 0.0.0.0 --port 8443 --attestor tsm-report

It reads the config here, at the boundary, and hands the server (`fedlib.split.server`) the
model, its section, the aggregator's keys and the attestor of the platform it runs on
(`fedlib.tee.attestors`; docs/tee.md)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from fedlib.config import FederationConfig, load_config
from fedlib.model.base import attach_lora, load_base_model
from fedlib.split.server import SplitServer, serve
from fedlib.tee.attestors import NitroNsmAttestor, TsmReportAttestor
from fedlib.tee.evidence import Attestor, NoTEE
from tasks.from_config import keyring

ATTESTORS: dict[str, Callable[[argparse.Namespace], Attestor]] = {
    "none": lambda _: NoTEE(),
    "aws-nitro-nsm": lambda _: NitroNsmAttestor(),
    "tsm-report": lambda args: TsmReportAttestor(vcek_file=args.vcek_file),
}


def split_server(config: FederationConfig, attestor: Attestor | None = None) -> SplitServer:
    model = attach_lora(load_base_model(config.model.source), config.lora, config.federation.seed)
    server = SplitServer.for_model(model, config.split, keyring(config))
    server.attestor = attestor or NoTEE()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="fedlib split fine-tuning server (the middle blocks)")
    parser.add_argument("config")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready", type=Path, help="write the bound port here once serving")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0 in a confidential VM)")
    parser.add_argument("--attestor", choices=sorted(ATTESTORS), default="none", help="where this server's TEE evidence comes from")
    parser.add_argument("--vcek-file", type=Path, help="tsm-report: the VCEK (DER, from AMD's KDS) where the host attaches none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve(split_server(load_config(args.config), ATTESTORS[args.attestor](args)), args.port, args.ready, args.host)


if __name__ == "__main__":
    main()
