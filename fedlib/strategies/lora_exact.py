"""Exact LoRA aggregation: the mean of the clients' products B_k·A_k, re-factored to rank r.

Averaging A and B separately gives mean(B)·mean(A), which is not mean(B·A): the cross terms
between clients are noise the adapter never learned. Here each client's factors are stacked
(weighted by √n_k), so that B_stack·A_stack = Σ n_k·B_k·A_k exactly (as in FLoRA, Wang et al.,
2024), and the stack is brought back to rank r by a truncated SVD done through two thin QRs, so
memory stays O(Σ ranks × (in + out)) rather than O(in × out) per module.

Because the products are what is averaged, clients may train different ranks: a client with a
smaller rank pads its factors with zeros up to the global shape (see `fedlib.model.ranks`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedlib.strategies.base import (
    ClientUpdate,
    Stateless,
    Tensors,
    add_delta,
    strategies,
)

_A, _B = ".lora_A.", ".lora_B."


def lora_pairs(state: Tensors) -> dict[str, tuple[str, str]]:
    """module prefix → (A name, B name), for every LoRA module in an adapter state."""
    pairs = {}
    for name in state:
        if _A in name:
            b = name.replace(_A, _B)
            if b not in state:
                raise ValueError(f"{name}: no matching lora_B tensor")
            pairs[name.split(_A)[0]] = (name, b)
    return pairs


def refactor(b_stack: torch.Tensor, a_stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B', A' of rank `rank` with B'·A' the best rank-r approximation of b_stack·a_stack,
    balanced (√S on each side) and with a deterministic sign per component."""
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_stack.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_new = (q_b @ u[:, :k]) * root
    a_new = root[:, None] * (vh[:k] @ q_a.T)
    flip = torch.sign(b_new.gather(0, b_new.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    flip[flip == 0] = 1
    b_new, a_new = b_new * flip, a_new * flip[:, None]
    if k < rank:  # fewer non-zero directions than the rank (e.g. the first round): pad with zeros
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], rank - k)], dim=1)
        a_new = torch.cat([a_new, a_new.new_zeros(rank - k, a_new.shape[1])], dim=0)
    return b_new, a_new


@strategies.register("lora_exact")
class ExactLoRA(Stateless):
    from_mean_only = False

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        pairs = lora_pairs(global_state)
        paired = {name for pair in pairs.values() for name in pair}
        b_parts: dict[str, list[torch.Tensor]] = {p: [] for p in pairs}
        a_parts: dict[str, list[torch.Tensor]] = {p: [] for p in pairs}
        others: Tensors = {}
        examples = 0
        for update in updates:
            w = float(update.num_examples)
            for prefix, (a, b) in pairs.items():
                scale = w**0.5
                b_parts[prefix].append((global_state[b].to(torch.float64) + update.delta[b]) * scale)
                a_parts[prefix].append((global_state[a].to(torch.float64) + update.delta[a]) * scale)
            for name, delta in update.delta.items():
                if name not in paired:
                    others[name] = others.get(name, 0) + delta.to(torch.float64) * w
            examples += update.num_examples
        if examples == 0:
            raise ValueError(f"round {round_number}: no updates to aggregate")
        out: Tensors = {}
        for prefix, (a, b) in pairs.items():
            b_stack = torch.cat(b_parts[prefix], dim=1) / examples**0.5
            a_stack = torch.cat(a_parts[prefix], dim=0) / examples**0.5
            b_new, a_new = refactor(b_stack, a_stack, global_state[a].shape[0])
            out[b], out[a] = b_new.to(global_state[b].dtype), a_new.to(global_state[a].dtype)
        out.update(add_delta({n: global_state[n] for n in others}, {n: v / examples for n, v in others.items()}))
        return out
