"""Split fine-tuning as a Prefect flow: the server's middle blocks in their own process, each
client's slices here, sealed activations and gradients between them over HTTP on 127.0.0.1.

With several clouds it is split federated learning: every client trains against the one
shared server part, and after each round the clients' parts (LoRA and SPF values) are averaged
by example count with the same FedAvg the federation uses.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from prefect import flow, get_run_logger

from fedlib.config import load_config
from fedlib.strategies import ClientUpdate, make_strategy
from fedlib.wire.serialization import tensors_to_bytes
from tasks.data import partition_data
from tasks.from_config import keyring
from tasks.split import fetch_server_part, open_server, split_evaluate, split_train_client
from tasks.tracking import finish_tracking, open_tracking, track_metrics, track_split_artifacts


def average_parts(results: dict[str, dict[str, Any]]) -> dict:
    """FedAvg of the clients' parts; the SPF indices are shared, so they pass through."""
    first = next(iter(results.values()))["state"]
    values = {k: v for k, v in first.items() if not k.endswith(".spf_index")}
    zero = {k: v.new_zeros(v.shape) for k, v in values.items()}
    updates = [ClientUpdate(c, r["examples"], {k: r["state"][k] for k in values}) for c, r in results.items()]
    averaged = make_strategy("fedavg").aggregate(0, zero, updates)
    return {**averaged, **{k: v for k, v in first.items() if k.endswith(".spf_index")}}


@flow(name="split-finetune", flow_run_name="split-{config_path}")
def split_finetune(config_path: str) -> dict[str, Any]:
    """Returns held-out perplexity before and after, and the per-step measurements."""
    config = load_config(config_path)
    logger = get_run_logger()
    keyring(config, create=True)
    assignment = partition_data(config)  # tokenises once, before the clients start
    run_id = open_tracking(config, None, run_name=f"{config.federation.id}-split-cut{config.split.cut}")
    server = open_server(config, config_path)
    status = "FAILED"
    try:
        before = split_evaluate(config, 0, server.url, None, None)
        track_metrics(config, run_id, {"eval/loss": before, "eval/perplexity": math.exp(before)}, 0)
        state, mask, losses, steps_seen = None, None, [], 0
        rounds = []
        for round_number in range(1, config.split.rounds + 1):
            results: dict[str, dict[str, Any]] = {}
            for cloud in config.clouds:  # one at a time: the first client's calibration fixes the shared masks
                results[cloud.name] = split_train_client(config, cloud.name, round_number, server.url, assignment[cloud.name], state, mask)
                mask = results[cloud.name]["mask"]
                for step in results[cloud.name]["steps"]:
                    steps_seen += 1
                    losses.append(step["loss"])
                    track_metrics(
                        config,
                        run_id,
                        {"split/loss": step["loss"], "split/bytes_per_step": step["bytes"], "split/step_s": step["seconds"]},
                        steps_seen,
                    )
            state = average_parts(results)
            loss = split_evaluate(config, round_number, server.url, state, mask)
            track_metrics(config, run_id, {"eval/loss": loss, "eval/perplexity": math.exp(loss)}, round_number)
            all_steps = [s for r in results.values() for s in r["steps"]]
            rounds.append(
                {
                    "round": round_number,
                    "perplexity": math.exp(loss),
                    "bytes_per_step": statistics.mean(s["bytes"] for s in all_steps),
                    "step_s": statistics.median(s["seconds"] for s in all_steps),
                }
            )
            logger.info("split round %d: held-out perplexity %.2f", round_number, math.exp(loss))
        server_part = tensors_to_bytes(fetch_server_part(config, server.url))
        track_split_artifacts(config, run_id, losses, {"client-part": tensors_to_bytes(state), "server-part": server_part})
        status = "FINISHED"
        return {"perplexity_before": math.exp(before), "rounds": rounds, "losses": losses, "run_id": run_id}
    finally:
        server.stop()
        finish_tracking(config, run_id, status)
