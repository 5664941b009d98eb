"""Sparse parameter fine-tuning (SPF): a few chosen base weights trained directly, beside LoRA.

A calibration pass scores every entry of the candidate weights by its gradient magnitude on
the client's data and keeps the top `fraction` of each tensor. Those entries get a trainable
delta through a parametrisation (W + scatter(delta)), so the base weight itself stays frozen
and the update is just (indices, values): that pair is what is saved with the adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

Tensors = dict[str, torch.Tensor]


class SparseDelta(nn.Module):
    """W ↦ W + delta at `index` (flat positions); only `values` trains."""

    index: torch.Tensor  # a buffer: saved with the module, not trained

    def __init__(self, index: torch.Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.shape = shape
        self.values = nn.Parameter(torch.zeros(index.numel()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device).index_put((self.index,), self.values.to(weight.dtype))
        return weight + delta.view(self.shape)


def candidate_weights(model: nn.Module, module_names: Iterable[str]) -> dict[str, nn.Linear]:
    """Linear layers whose name ends with one of `module_names` (e.g. `down_proj`), skipping
    LoRA's own layers."""
    wanted = tuple(module_names)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in wanted and "lora_" not in name
    }


def attach_sparse(model: nn.Module, mask: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    """Parametrise each masked weight; returns the trainable value vectors."""
    modules = dict(model.named_modules())
    params = []
    for name, index in mask.items():
        module = modules[name]
        delta = SparseDelta(index, module.weight.shape)
        parametrize.register_parametrization(module, "weight", delta)
        params.append(delta.values)
    return params


def sparse_state(model: nn.Module) -> Tensors:
    """`<module>.spf_index` and `<module>.spf_values` for every parametrised weight."""
    out: Tensors = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in cast(Any, module).parametrizations.weight:
                if isinstance(p, SparseDelta):
                    out[f"{name}.spf_index"] = p.index.clone()
                    out[f"{name}.spf_values"] = p.values.detach().clone()
    return out
