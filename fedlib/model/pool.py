"""Base models loaded once per process and reused across clients and rounds, adapters swapped.

Loading the base model is what a round would otherwise pay per client (an 8B model is 16 GB in
bf16), so each process keeps the LoRA-wrapped models it built and lends one out at a time: a
borrower loads the adapter it needs into it (every LoRA tensor is overwritten, so nothing of the
last borrower's adapter survives) and gives it back. Clients training at once in one process
(threads, `orchestration.dispatch: local`) each get their own model, built the first time; the
next round finds them idle.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from peft import PeftModel

from fedlib.config import LoraSettings, TrainingConfig
from fedlib.model.base import Tensors, adapter_state, attach_lora, load_adapter_state, load_base_model
from fedlib.placement import Placement


@dataclass(frozen=True)
class ModelKey:
    source: str
    placement: Placement
    lora: LoraSettings
    seed: int
    gradient_checkpointing: bool = False

    @classmethod
    def of(cls, source: str, training: TrainingConfig, lora: LoraSettings, seed: int, rank: int | None = None) -> ModelKey:
        """Which pooled model a run borrows: base, placement, LoRA shape (of `rank`, the
        configured rank unless given), seed."""
        settings = lora if rank is None else lora.model_copy(update={"r": rank})
        return cls(source, training.placement, settings, seed, training.gradient_checkpointing)


class ModelPool:
    def __init__(self, max_idle: int = 4):
        self.max_idle = max_idle
        self._idle: list[tuple[ModelKey, PeftModel]] = []
        self._lock = threading.Lock()
        self._initial: dict[ModelKey, Tensors] = {}  # each key's adapter as LoRA's seeded init drew it
        self.loads = 0  # base models built by this pool: what reuse saves

    def _take(self, key: ModelKey) -> PeftModel | None:
        with self._lock:
            for i, (k, model) in enumerate(self._idle):
                if k == key:
                    del self._idle[i]
                    return model
        return None

    def _give_back(self, key: ModelKey, model: PeftModel) -> None:
        with self._lock:
            self._idle.append((key, model))
            del self._idle[: max(0, len(self._idle) - self.max_idle)]  # the longest idle go first

    @contextlib.contextmanager
    def lora_model(self, key: ModelKey, adapter: Tensors | None) -> Iterator[PeftModel]:
        """A LoRA model for `key` holding `adapter`. With `adapter=None` it holds whatever it
        held: only for scoring the base model through `disable_adapter()`. A model whose
        borrower failed is not given back: its weights may be half-updated."""
        model = self._take(key)
        if model is None:
            base = load_base_model(key.source, key.placement, key.gradient_checkpointing)
            model = attach_lora(base, key.lora, key.seed)
            with self._lock:
                self.loads += 1
                self._initial.setdefault(key, adapter_state(model))
        if adapter is not None:
            load_adapter_state(model, {k: v.to(next(model.parameters()).device) for k, v in adapter.items()})
        yield model
        model.zero_grad(set_to_none=True)
        self._give_back(key, model)

    def initial_adapter(self, key: ModelKey) -> Tensors:
        """The adapter a model of `key` starts with (the seeded round-0 global), without a base
        model load of its own when one of this key was built before."""
        if key not in self._initial:
            with self.lora_model(key, None):
                pass
        return {name: value.clone() for name, value in self._initial[key].items()}


POOL = ModelPool()  # this process's
