"""One client's local LoRA fine-tuning, on transformers' `Trainer`.

The trainer does what a user of transformers expects of it: mixed precision, gradient
accumulation, gradient checkpointing, clipping, the learning-rate schedule, and several processes
(DDP under accelerate; gloo on a CPU). What federated learning adds goes through the trainer's
hooks: FedProx's proximal term is a `compute_loss` override, the step budget is `max_steps`,
reproducible batches are `data_seed`, and emulated pacing and progress are a callback.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from peft import PeftModel
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from fedlib.examples import IGNORE, Examples, as_examples, collate


@dataclass(frozen=True)
class LocalTraining:
    losses: tuple[float, ...]
    examples_seen: int
    tokens_seen: int = 0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


@dataclass(frozen=True)
class Validation:
    """A client's score of the global adapter it received, on its own validation split."""

    loss: float
    tokens: int


@dataclass(frozen=True)
class StepProgress:
    """One optimizer step done: what a progress bar shows."""

    step: int
    steps: int
    loss: float
    tokens_per_s: float


@dataclass(frozen=True)
class TrainingPlan:
    """The part of the config one local run uses. `batch_size` is examples per optimizer step,
    over every process and micro-batch; each process takes `batch_size / (processes ×
    gradient_accumulation_steps)` per micro-batch. `precision` is the autocast precision
    (`bf16`, `fp16`, or `fp32` for none)."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    proximal_mu: float = 0.0
    slowdown: float = 1.0  # > 1: pause after each step so that it takes this many times as long
    min_step_s: float = 0.0  # and at least this long: how one machine plays a slower cloud
    processes: int = 1

    def micro_batch(self, examples: int) -> int:
        per_step = min(self.batch_size, examples)
        return max(1, per_step // (self.processes * self.gradient_accumulation_steps))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, examples: Examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples.row(i)


class _FederatedTrainer(Trainer):
    """`Trainer` plus FedProx's μ/2·‖w − w_start‖² over the trainable weights."""

    def __init__(self, *args, proximal_mu: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.proximal_mu = proximal_mu
        self.start = [p.detach().clone() for p in cast(nn.Module, self.model).parameters() if p.requires_grad] if proximal_mu > 0 else []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.start:
            return result
        loss, outputs = result if return_outputs else (result, None)
        params = [p for p in model.parameters() if p.requires_grad]
        proximal = self.proximal_mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, self.start, strict=True))
        # Once per optimizer step: each micro-batch's loss is summed, the trainer only divides
        # a loss not already normalised by the step's token count (see Trainer.training_step).
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            proximal = proximal / self.args.gradient_accumulation_steps
        loss = loss + proximal
        return (loss, outputs) if return_outputs else loss


class _Pacing(TrainerCallback):
    """Records each step's loss, refuses a non-finite one, reports progress, and pauses a step
    when this machine plays a slower cloud."""

    def __init__(self, plan: TrainingPlan, on_step: Callable[[StepProgress], None] | None):
        self.plan, self.on_step = plan, on_step
        self.losses: list[float] = []
        self.step_started = self.started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss}; lower training.learning_rate")
        self.losses.append(float(loss))
        if self.on_step is not None:
            rate = state.num_input_tokens_seen / max(time.perf_counter() - self.started, 1e-9)
            self.on_step(StepProgress(state.global_step, self.plan.steps, float(loss), rate))

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.step_started
        pause = max(elapsed * (self.plan.slowdown - 1), self.plan.min_step_s - elapsed)
        if pause > 0:
            time.sleep(pause)


# accelerate keeps its state per process, not per trainer. Each `TrainingArguments` would reset
# it, under the feet of a trainer running in another thread (clients as threads in one process),
# so the state is made once and every trainer uses it as configured. Its gradient-accumulation
# flag is per process too: two trainers accumulating at once would step each other's optimizers.
_ACCUMULATING = threading.Lock()
_STATE_LOCK = threading.Lock()
_active = 0  # trainers running in this process on the configured state


@contextlib.contextmanager
def _process_state(cpu: bool, precision: str, processes: int):
    """accelerate's process state for this run: made by the first trainer, shared by those that
    run beside it, and remade (only while none runs) for a run that needs another precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    global _active
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    with _STATE_LOCK:
        state = AcceleratorState._shared_state
        if state and (state.get("_mixed_precision") != mixed or bool(state.get("_cpu")) != cpu):
            if _active:
                raise RuntimeError(f"another client trains in this process with other precision settings than {precision}")
            AcceleratorState._reset_state(reset_partial_state=processes == 1)
        if not AcceleratorState._shared_state:
            if processes > 1 and cpu:
                PartialState(cpu=True, backend="gloo")
            Accelerator(cpu=cpu, mixed_precision=mixed)
        _active += 1
    try:
        yield
    finally:
        with _STATE_LOCK:
            _active -= 1


def train_lora(
    model: PeftModel,
    data: Examples | torch.Tensor,
    plan: TrainingPlan,
    on_step: Callable[[StepProgress], None] | None = None,
) -> LocalTraining:
    """`plan.steps` optimizer steps on batches drawn (without replacement, reshuffled each pass)
    by a sampler seeded with `plan.seed`, so a client's batches are reproducible per round."""
    examples = as_examples(data)
    cpu = next(model.parameters()).device.type == "cpu"
    pacing = _Pacing(plan, on_step)
    accumulating = _ACCUMULATING if plan.gradient_accumulation_steps > 1 else contextlib.nullcontext()
    with (
        tempfile.TemporaryDirectory(prefix="fedlib-trainer-") as scratch,
        _process_state(cpu, plan.precision, plan.processes),
        accumulating,
    ):
        args = TrainingArguments(
            accelerator_config={"use_configured_state": True},
            output_dir=scratch,
            max_steps=plan.steps,
            per_device_train_batch_size=plan.micro_batch(len(examples)),
            gradient_accumulation_steps=plan.gradient_accumulation_steps,
            learning_rate=plan.learning_rate,
            weight_decay=0.0,
            lr_scheduler_type=plan.lr_scheduler,
            warmup_steps=plan.warmup_steps,
            max_grad_norm=plan.max_grad_norm if plan.max_grad_norm else 0.0,
            activation_checkpointing=plan.gradient_checkpointing,  # transformers 5's name for it
            activation_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
            bf16=plan.precision == "bf16",
            fp16=plan.precision == "fp16",
            use_cpu=cpu,
            ddp_backend="gloo" if cpu and plan.processes > 1 else None,
            seed=plan.seed,
            data_seed=plan.seed,
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",
        )
        trainer = _FederatedTrainer(
            model=model,
            args=args,
            train_dataset=_Rows(examples),
            data_collator=lambda rows: collate(rows, pad_id=0),
            callbacks=[pacing],
            proximal_mu=plan.proximal_mu,
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to `on_step`, not stdout
        trainer.train()
        tokens = int(trainer.state.num_input_tokens_seen)
    if plan.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    return LocalTraining(losses=tuple(pacing.losses), examples_seen=plan.steps * min(plan.batch_size, len(examples)), tokens_seen=tokens)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: Examples | torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over every label token (a completion's, not its prompt's; all of a
    text block's). Perplexity is exp of this."""
    examples = as_examples(data)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = [examples.row(i) for i in range(start, min(start + batch_size, len(examples)))]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id=0).items()}
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        if tokens:
            total += model(**batch).loss.float().item() * tokens
            count += tokens
    return total / max(count, 1)
