"""A client's local run, in this process or as N processes on its machine (`clouds[].processes`).

N processes are one per GPU, started here (not by `torch.distributed.run`, whose rendezvous
store listens on every interface, unauthenticated, for the run's length). They meet through a
file store in the private scratch folder, so nothing listens for the rendezvous, and gloo binds
to loopback only. Transformers' `Trainer` (through accelerate) then runs DDP between them, over NCCL on GPUs and gloo on a CPU, and they still
yield one update: the global batch is split across them and their gradients averaged, so the
result is the one-process run's on the same global batch. Rank 0 scores the received adapter on
the validation split and writes the trained adapter back; everything travels through a private
scratch folder on the client's own disk, never through storage.

`python -m fedlib.model.distributed JOB_DIR` is the worker's entry point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from fedlib.config import LoraSettings
from fedlib.examples import Examples, as_examples
from fedlib.model.base import Tensors, adapter_state, attach_lora, load_adapter_state, load_base_model
from fedlib.model.pool import ModelKey
from fedlib.model.training import LocalTraining, StepProgress, TrainingPlan, Validation, evaluate_loss, train_lora
from fedlib.placement import Placement

_PROGRESS = "fedlib-step "  # rank 0's step events on its stdout, as JSON


@dataclass(frozen=True)
class ScoredRun:
    adapter: Tensors  # trained, on the CPU
    training: LocalTraining
    validation: Validation | None


def score_and_train(
    model: PeftModel,
    examples: Examples,
    validation: Examples | torch.Tensor | None,
    plan: TrainingPlan,
    eval_batch: int,
    on_step: Callable[[StepProgress], None] | None = None,
    score: bool = True,
) -> ScoredRun:
    scored = None
    if score and validation is not None and len(validation):
        held = as_examples(validation)
        scored = Validation(evaluate_loss(model, held, eval_batch), held.loss_tokens)
    training = train_lora(model, examples, plan, on_step)
    return ScoredRun(adapter_state(model), training, scored)


def train_in_processes(
    key: ModelKey,
    adapter: Tensors,
    examples: Examples,
    validation: Examples | torch.Tensor | None,
    plan: TrainingPlan,
    eval_batch: int,
    on_step: Callable[[StepProgress], None] | None = None,
) -> ScoredRun:
    with tempfile.TemporaryDirectory(prefix="fedlib-ddp-") as scratch:  # 0700: the client's data passes through it
        job = Path(scratch)
        tensors = {f"adapter.{k}": v.contiguous() for k, v in adapter.items()} | examples.tensors("train.")
        if validation is not None and len(validation):
            tensors |= as_examples(validation).tensors("validation.")
        tensors = _unshared(tensors)
        save_file(tensors, str(job / "inputs.safetensors"))
        (job / "job.json").write_text(json.dumps({"key": _key_json(key), "plan": dataclasses.asdict(plan), "eval_batch": eval_batch}))
        workers = [_spawn(job, rank, plan.processes) for rank in range(plan.processes)]
        tail: list[str] = []
        for line in workers[0].stdout:  # type: ignore[union-attr]  # rank 0 reports the steps
            if line.startswith(_PROGRESS):
                if on_step is not None:
                    on_step(StepProgress(**json.loads(line[len(_PROGRESS) :])))
            else:
                tail = [*tail[-40:], line]
        codes = [worker.wait() for worker in workers]
        for worker in workers:
            if worker.stdout is not None:
                tail += worker.stdout.readlines()[-20:]
                worker.stdout.close()
        if any(codes):
            raise RuntimeError(f"training in {plan.processes} processes failed (exits {codes}):\n{''.join(tail[-60:])}")
        result = json.loads((job / "result.json").read_text())
        trained = load_file(str(job / "adapter.safetensors"))
    scored = Validation(**result["validation"]) if result["validation"] else None
    return ScoredRun(trained, LocalTraining(tuple(result["losses"]), result["examples_seen"], result["tokens_seen"]), scored)


def _key_json(key: ModelKey) -> dict:
    return {
        "source": key.source,
        "placement": dataclasses.asdict(key.placement),
        "lora": key.lora.model_dump(mode="json"),
        "seed": key.seed,
        "gradient_checkpointing": key.gradient_checkpointing,
    }


def _unshared(tensors: Tensors) -> Tensors:
    """safetensors refuses tensors that share memory (plain text blocks are their own labels):
    a copy of each one whose storage another already uses."""
    seen: set[int] = set()
    out = {}
    for name, value in tensors.items():
        pointer = value.untyped_storage().data_ptr()
        out[name] = value.clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    return out


def _spawn(job: Path, rank: int, world: int) -> subprocess.Popen:
    """One worker of the run: its rank in the environment, as `torch.distributed.run` would set it,
    and the rendezvous a file in the job's private folder."""
    env = {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "MASTER_ADDR": "127.0.0.1",
    }
    env.pop("MASTER_PORT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "fedlib.model.distributed", str(job)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _join_group(job: Path, placement: Placement) -> None:
    """The process group, met through `job/rendezvous` (a FileStore), before accelerate looks: it
    uses a group that exists rather than making its own TCP store."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if placement.device == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=f"file://{job / 'rendezvous'}", rank=int(os.environ["RANK"]), world_size=world
        )


def _worker(job: Path) -> None:
    spec = json.loads((job / "job.json").read_text())
    key_spec, plan = spec["key"], TrainingPlan(**spec["plan"])
    placement = Placement(**key_spec["placement"])
    rank = int(os.environ.get("RANK", "0"))
    if placement.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _join_group(job, placement)
    inputs = load_file(str(job / "inputs.safetensors"))
    adapter = {k.removeprefix("adapter."): v for k, v in inputs.items() if k.startswith("adapter.")}
    examples = Examples.from_tensors(inputs, "train.")
    validation = Examples.from_tensors(inputs, "validation.") if "validation.input_ids" in inputs else None
    base = load_base_model(key_spec["source"], placement, key_spec["gradient_checkpointing"])
    model = attach_lora(base, LoraSettings(**key_spec["lora"]), key_spec["seed"])
    load_adapter_state(model, {k: v.to(next(model.parameters()).device) for k, v in adapter.items()})

    def report(step: StepProgress) -> None:
        print(_PROGRESS + json.dumps(dataclasses.asdict(step)), flush=True)

    run = score_and_train(model, examples, validation, plan, spec["eval_batch"], report if rank == 0 else None, score=rank == 0)
    if rank == 0:
        save_file(run.adapter, str(job / "adapter.safetensors"))
        (job / "result.json").write_text(json.dumps({
            "losses": list(run.training.losses), "examples_seen": run.training.examples_seen,
            "tokens_seen": run.training.tokens_seen,
            "validation": dataclasses.asdict(run.validation) if run.validation else None,
        }))  # fmt: skip


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
