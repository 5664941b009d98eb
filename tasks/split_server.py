"""The split server's process, started beside the split flow:

    python -m tasks.split_server CONFIG --port PORT [--ready FILE]

It reads the config here, at the boundary, and hands the server (`fedlib.split.server`) the
model, its section and the aggregator's keys."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedlib.config import FederationConfig, load_config
from fedlib.model.base import attach_lora, load_base_model
from fedlib.split.server import SplitServer, serve
from tasks.from_config import keyring


def split_server(config: FederationConfig) -> SplitServer:
    model = attach_lora(load_base_model(config.model.source), config.lora, config.federation.seed)
    return SplitServer.for_model(model, config.split, keyring(config))


def main() -> None:
    parser = argparse.ArgumentParser(description="fedlib split fine-tuning server (the middle blocks)")
    parser.add_argument("config")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready", type=Path, help="write the bound port here once serving")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve(split_server(load_config(args.config)), args.port, args.ready)


if __name__ == "__main__":
    main()
