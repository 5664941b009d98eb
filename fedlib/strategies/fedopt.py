"""Server optimisers on the averaged client delta (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; FedAvgM from Hsu et al., 2019).

The mean delta Δ is treated as a pseudo-gradient step. FedAvgM keeps a momentum buffer; FedAdam,
FedYogi and FedAdagrad keep a first moment m and a second moment v and step by
η·m / (√v + τ), which lets the server take larger steps on coordinates the clients agree on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fedlib.strategies.base import ClientUpdate, Tensors, add_delta, strategies
from fedlib.strategies.fedavg import weighted_mean_delta


class _ServerState:
    """Named float64 buffers that survive the round through `state_dict`."""

    from_mean_only = True

    buffers: dict[str, Tensors]

    def state_dict(self) -> Tensors:
        return {f"{kind}/{name}": value for kind, tensors in self.buffers.items() for name, value in tensors.items()}

    def load_state_dict(self, state: Tensors) -> None:
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind not in self.buffers:
                raise ValueError(f"{type(self).__name__}: unknown state {key!r}")
            self.buffers[kind][name] = value.to(torch.float64)

    def _buffer(self, kind: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        if name not in self.buffers[kind]:
            self.buffers[kind][name] = torch.full(like.shape, fill, dtype=torch.float64)
        return self.buffers[kind][name]


@strategies.register("fedavgm")
@dataclass
class FedAvgM(_ServerState):
    server_lr: float = 1.0
    momentum: float = 0.9
    buffers: dict[str, Tensors] = field(default_factory=lambda: {"momentum": {}}, repr=False)

    def __post_init__(self) -> None:
        if self.server_lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need server_lr > 0 and 0 <= momentum < 1, got {self.server_lr}, {self.momentum}")

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        step = {}
        for name, delta in weighted_mean_delta(round_number, updates).items():
            buffer = self._buffer("momentum", name, delta)
            buffer.mul_(self.momentum).add_(delta)
            step[name] = self.server_lr * buffer
        return add_delta(global_state, step)


@dataclass
class _Adaptive(_ServerState):
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    buffers: dict[str, Tensors] = field(default_factory=lambda: {"m": {}, "v": {}}, repr=False)

    def __post_init__(self) -> None:
        if self.server_lr <= 0 or self.tau <= 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("need server_lr > 0, tau > 0, and betas in [0, 1)")

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        step = {}
        for name, delta in weighted_mean_delta(round_number, updates).items():
            m = self._buffer("m", name, delta)
            m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            # v starts at τ², as in the paper, so the first step is not η·sign(Δ) everywhere.
            v = self._buffer("v", name, delta, fill=self.tau**2)
            v.copy_(self.second_moment(v, delta * delta))
            step[name] = self.server_lr * m / (v.sqrt() + self.tau)
        return add_delta(global_state, step)


@strategies.register("fedadam")
class FedAdam(_Adaptive):
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq


@strategies.register("fedyogi")
class FedYogi(_Adaptive):
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


@strategies.register("fedadagrad")
class FedAdagrad(_Adaptive):
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq
