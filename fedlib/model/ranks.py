"""Clients that train a smaller LoRA rank than the global adapter.

A client with rank k starts from the global adapter's first k components and sends its result
padded back to the global shape, so every update on the wire has the same tensors and the
aggregator needs no per-client shapes. PEFT scales B·A by alpha/r, so both directions rescale
the factors by √(k/r) to keep the product the model actually applies. The first k components
are the strongest ones when the global adapter comes from `lora_exact`, which orders them by
singular value.
"""

from __future__ import annotations

import math

import torch

from fedlib.strategies.lora_exact import lora_pairs

Tensors = dict[str, torch.Tensor]


def truncate_adapter(global_adapter: Tensors, global_rank: int, rank: int) -> Tensors:
    """The rank-`rank` adapter whose scaled product equals the global one's first `rank` components."""
    if rank == global_rank:
        return global_adapter
    c = math.sqrt(rank / global_rank)
    out = dict(global_adapter)
    for a, b in lora_pairs(global_adapter).values():
        out[a] = global_adapter[a][:rank] * c
        out[b] = global_adapter[b][:, :rank] * c
    return out


def pad_adapter(local: Tensors, global_adapter: Tensors, global_rank: int, rank: int) -> Tensors:
    """A rank-`rank` adapter in the global shape with the same scaled product: B padded with
    zero columns, A with the global's own rows (so those rows' deltas are zero)."""
    if rank == global_rank:
        return local
    c = math.sqrt(rank / global_rank)
    out = dict(local)
    for a, b in lora_pairs(global_adapter).values():
        out[a] = torch.cat([local[a] / c, global_adapter[a][rank:]], dim=0)
        out[b] = torch.cat([local[b] / c, global_adapter[b].new_zeros(global_adapter[b].shape[0], global_rank - rank)], dim=1)
    return out
