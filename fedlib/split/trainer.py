"""One side's trainable part of a split model: LoRA already in its blocks, plus SPF on its
candidate weights once calibrated. The client and the server each hold one of these."""

from __future__ import annotations

import torch
from torch import nn

from fedlib.config import SplitConfig
from fedlib.split.sparse import attach_sparse, candidate_weights, sparse_state

Tensors = dict[str, torch.Tensor]


class SliceTrainer:
    def __init__(self, modules: dict[str, nn.Module], config: SplitConfig) -> None:
        self.modules = modules  # prefix -> module, e.g. {"front": ..., "head": ...}
        self.config = config
        self.candidates = {
            f"{prefix}.{name}": layer
            for prefix, module in modules.items()
            for name, layer in candidate_weights(module, config.spf_modules).items()
        }
        self.scores: Tensors = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"{prefix}.{name}": p for prefix, module in self.modules.items() for name, p in module.named_parameters() if "lora_" in name
        }

    def begin_calibration(self) -> None:
        for layer in self.candidates.values():
            layer.weight.requires_grad_(True)

    def accumulate_scores(self) -> None:
        """Add |∂loss/∂W| of the batch just back-propagated; clears those gradients."""
        for name, layer in self.candidates.items():
            if layer.weight.grad is not None:
                self.scores[name] = self.scores.get(name, 0) + layer.weight.grad.abs()
                layer.weight.grad = None
        for p in self.lora_parameters().values():
            p.grad = None

    def end_calibration(self) -> dict[str, torch.Tensor]:
        """Fix the SPF mask (top `spf_fraction` of each candidate by score) and start training
        with it; returns the mask, `<prefix>.<module>` → flat indices."""
        for layer in self.candidates.values():
            layer.weight.requires_grad_(False)
            layer.weight.grad = None
        mask = {}
        for name, score in self.scores.items():
            k = max(1, int(self.config.spf_fraction * score.numel()))
            mask[name] = torch.topk(score.flatten(), k).indices.sort().values
        self.use_mask(mask)
        return mask

    def use_mask(self, mask: dict[str, torch.Tensor]) -> None:
        """Parametrise the masked weights and start the optimiser over LoRA and SPF. Clients
        of one split federation share the first client's mask, so their SPF values average."""
        spf = []
        for prefix, module in self.modules.items():
            mine = {name[len(prefix) + 1 :]: index for name, index in mask.items() if name.startswith(prefix + ".")}
            spf += attach_sparse(module, mine)
        self.optimizer = torch.optim.AdamW([*self.lora_parameters().values(), *spf], lr=self.config.learning_rate, weight_decay=0.0)

    def step(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("calibrate before training: the SPF mask is not fixed yet")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> Tensors:
        """LoRA weights and SPF (indices, values) of this side, under `<prefix>.<name>`."""
        out = {name: p.detach().clone() for name, p in self.lora_parameters().items()}
        for prefix, module in self.modules.items():
            out.update({f"{prefix}.{name}": value for name, value in sparse_state(module).items()})
        return out

    def load_state(self, state: Tensors) -> None:
        """LoRA and SPF values from another copy of this side (same mask), e.g. the average."""
        with torch.no_grad():
            for name, p in self.lora_parameters().items():
                p.copy_(state[name])
            for prefix, module in self.modules.items():
                for key in sparse_state(module):
                    if key.endswith(".spf_values"):
                        _values_of(module, key).copy_(state[f"{prefix}.{key}"])


def _values_of(module: nn.Module, key: str) -> torch.Tensor:
    from fedlib.split.sparse import SparseDelta

    owner = dict(module.named_modules())[key[: -len(".spf_values")]]
    return next(p.values for p in owner.parametrizations.weight if isinstance(p, SparseDelta))
