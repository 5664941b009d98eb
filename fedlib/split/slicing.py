"""A decoder-only causal LM cut in three: the client's front (embeddings and the first k
blocks), the server's middle (the remaining blocks), and the client's head (final norm and LM
head). Raw tokens and labels stay with the client; only hidden states cross the cut.

Works for the transformers models laid out as `model.model.{embed_tokens, layers, norm,
rotary_emb}` and `model.lm_head` (Llama, and SmolLM2 which is one), bare or wrapped by PEFT.
The modules are shared with the model, not copied, so LoRA layers injected into it train in
whichever slice holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask


def _unwrapped(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model: nn.Module) -> Any:  # a transformers decoder: embed_tokens, layers, norm, rotary_emb
    inner = _unwrapped(model)
    decoder = getattr(inner, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise TypeError(f"{type(inner).__name__}: not a decoder-only LM with embed_tokens/layers/norm/rotary_emb")
    return decoder


class BlockStack(nn.Module):
    """A run of decoder blocks. Positions and the causal mask follow from the sequence length
    alone, so the server needs nothing from the client but the hidden states."""

    def __init__(self, config, layers: list[nn.Module], rotary_emb: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = rotary_emb

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not len(self.layers):
            return hidden
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
        return hidden


class ClientFront(nn.Module):
    def __init__(self, embed_tokens: nn.Module, blocks: BlockStack) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.blocks = blocks

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed_tokens(input_ids))


class ClientHead(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, mean over predicted tokens (transformers' own definition)."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


@dataclass(frozen=True)
class ModelSlices:
    front: ClientFront
    middle: BlockStack
    head: ClientHead
    cut: int


def slice_model(model: nn.Module, cut: int) -> ModelSlices:
    """front = embeddings + blocks[:cut], middle = blocks[cut:], head = norm + LM head."""
    decoder = _decoder(model)
    layers = list(decoder.layers)
    if not 0 <= cut <= len(layers):
        raise ValueError(f"split.cut={cut} must be between 0 and the model's {len(layers)} blocks")
    inner = _unwrapped(model)
    config = inner.config
    return ModelSlices(
        front=ClientFront(decoder.embed_tokens, BlockStack(config, layers[:cut], decoder.rotary_emb)),
        middle=BlockStack(config, layers[cut:], decoder.rotary_emb),
        head=ClientHead(decoder.norm, inner.lm_head),
        cut=cut,
    )
