"""One client's local LoRA fine-tuning: a straight loop, read top to bottom."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from peft import PeftModel


@dataclass(frozen=True)
class LocalTraining:
    losses: tuple[float, ...]
    examples_seen: int

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def train_lora(
    model: PeftModel,
    blocks: torch.Tensor,  # [n, seq_len] token ids of this client's shard
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    slowdown: float = 1.0,
    min_step_s: float = 0.0,
) -> LocalTraining:
    """Plain causal-LM loss (labels = inputs) on batches drawn with replacement from the shard,
    plus FedProx's μ/2·‖w − w_start‖² over the trainable weights when `proximal_mu` > 0.

    Sampling uses the passed generator so that a client's batches are reproducible per round.
    `slowdown` > 1 pauses after each step so that it takes that many times as long, and
    `min_step_s` so that it takes at least that long: how one machine plays a slower cloud."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        step_started = time.perf_counter()
        index = torch.randint(len(blocks), (min(batch_size, len(blocks)),), generator=generator)
        batch = blocks[index]  # [b, seq_len]
        loss = model(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()}; lower training.learning_rate")
        objective = loss
        if start:
            objective = loss + proximal_mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(params, start))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - step_started
        pause = max(elapsed * (slowdown - 1), min_step_s - elapsed)
        if pause > 0:
            time.sleep(pause)
    model.eval()
    return LocalTraining(losses=tuple(losses), examples_seen=steps * min(batch_size, len(blocks)))


@torch.no_grad()
@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over all blocks; every block has the same length, so batch means
    weighted by batch size give the token mean. Perplexity is exp of this."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
        count += len(batch)
    return total / count
