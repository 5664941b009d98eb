"""The demo's work as a Flower app (Message API, simulation engine), for `bench/vs_flower.py`.

Same config, corpus, partition, seeds, LoRA initialisation, `Trainer`-based local training and
held-out scoring as fedlib's flow, through fedlib's own functions: only the orchestration
differs (Flower's FedAvg over the trained adapters, weighted by each client's examples, against
fedlib's sealed updates, checkpoints, tracking and registry). Runs in the Flower environment that
`bench/vs_flower.py` makes, and prints one JSON line per scored round:

    FEDLIB_BENCH_CONFIG=run.yaml PYTHONPATH=. .bench/flower-env/bin/python bench/flower_app.py
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from fedlib.config import FederationConfig, load_config  # noqa: E402
from fedlib.round.client import train_delta  # noqa: E402
from tasks.from_config import (  # noqa: E402
    FederationData,
    evaluate_adapter,
    evaluation_examples,
    initial_adapter,
    load_data,
    local_round,
    partition_clients,
)


@functools.cache
def _federation() -> tuple[FederationConfig, FederationData, dict[str, list[int]]]:
    """Read once per process (each Flower client is a process of its own)."""
    config = load_config(os.environ["FEDLIB_BENCH_CONFIG"])
    data = load_data(config)
    return config, data, partition_clients(config, data)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config, data, assignment = _federation()
    index = int(context.node_config["partition-id"])
    client = config.clouds[index].name
    round_number = int(msg.content["config"]["server-round"])
    shard = data.train.select(assignment[client])
    validation = data.validation(index, len(config.clouds), config.evaluation.client_blocks)
    received = msg.content["arrays"].to_torch_state_dict()
    delta, result, _ = train_delta(local_round(config, client, round_number), received, shard, validation)
    trained = {name: tensor + delta[name] if name in delta else tensor for name, tensor in received.items()}
    metrics = MetricRecord({"num-examples": len(shard), "train-loss": result.mean_loss})
    return Message(content=RecordDict({"arrays": ArrayRecord(torch_state_dict=trained), "metrics": metrics}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config, _, _ = _federation()
    examples = evaluation_examples(config)

    def evaluate(round_number: int, arrays: ArrayRecord) -> MetricRecord:
        adapter = None if round_number == 0 else arrays.to_torch_state_dict()  # round 0: the base model, as fedlib scores it
        perplexity = math.exp(evaluate_adapter(config, adapter, examples))
        print(json.dumps({"round": round_number, "perplexity": perplexity, "at_s": time.perf_counter() - START}), flush=True)
        return MetricRecord({"perplexity": perplexity})

    clients = len(config.clouds)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    initial = ArrayRecord(torch_state_dict=initial_adapter(config))
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=config.training.rounds, evaluate_fn=evaluate)


def simulate() -> None:
    clients = len(load_config(os.environ["FEDLIB_BENCH_CONFIG"]).clouds)
    cores = os.cpu_count() or 1
    # Every client at once, each a single-threaded process sharing the machine's cores: Flower's
    # way (a Ray actor per client), as fedlib runs every embedded client at once.
    resources = {"client_resources": {"num_cpus": cores / clients, "num_gpus": 0.0}, "init_args": {"num_cpus": cores}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients, backend_config=resources)


if __name__ == "__main__":
    # Ray's workers import the apps by module name, which `__main__` is not: run them from the module.
    from bench import flower_app

    flower_app.simulate()
