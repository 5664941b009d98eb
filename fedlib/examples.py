"""Training examples as the trainer sees them: token ids, the labels the loss covers, and lengths.

A block of plain text is an example whose every token is a label. An instruction record is an
example whose prompt tokens are `IGNORE` (they condition the model, the loss never covers them),
and a record shorter than `seq_len` is padded on the right, its padding masked out of attention
and loss alike. One type for both means one trainer, one shard format and one scorer.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import torch

IGNORE = -100  # the label transformers' causal-LM loss skips


@dataclass(frozen=True)
class Examples:
    input_ids: torch.Tensor  # [n, seq_len] int64, right-padded
    labels: torch.Tensor  # [n, seq_len] int64, IGNORE where no loss
    lengths: torch.Tensor  # [n] int64, real tokens per row (the rest is padding)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> Examples:
        """Fixed-length blocks of text: every token is real and every token is a label."""
        return cls(blocks, blocks, torch.full((len(blocks),), blocks.shape[1], dtype=torch.long))

    @classmethod
    def empty(cls, seq_len: int) -> Examples:
        return cls.from_blocks(torch.empty(0, seq_len, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def attention_mask(self) -> torch.Tensor:
        return (torch.arange(self.seq_len) < self.lengths[:, None]).long()

    @property
    def loss_tokens(self) -> int:
        """Tokens the causal-LM loss averages over (a label is predicted from the token before it)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def __getitem__(self, index) -> Examples:
        index = torch.as_tensor(index, dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index], self.lengths[index])

    def head(self, count: int) -> Examples:
        return self[torch.arange(min(count, len(self)))]

    def row(self, i: int) -> dict[str, torch.Tensor]:
        n = int(self.lengths[i])
        return {"input_ids": self.input_ids[i, :n], "labels": self.labels[i, :n]}

    def digest(self, salt: bytes = b"") -> str:
        """What identifies this data without showing it (logged as a dataset's digest). A client
        salts it with a secret of its own: an unsalted digest would let whoever reads it confirm
        a guessed dataset by hashing the guess."""
        h = hmac.new(salt, digestmod=hashlib.sha256) if salt else hashlib.sha256()
        for t in (self.input_ids, self.labels, self.lengths):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}input_ids": self.input_ids.contiguous(),
            f"{prefix}labels": self.labels.contiguous(),
            f"{prefix}lengths": self.lengths.contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> Examples:
        return cls(tensors[f"{prefix}input_ids"], tensors[f"{prefix}labels"], tensors[f"{prefix}lengths"])

    @classmethod
    def concat(cls, parts: list[Examples], seq_len: int) -> Examples:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(seq_len)
        return cls(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]), torch.cat([p.lengths for p in parts]))


def as_examples(data: Examples | torch.Tensor) -> Examples:
    return data if isinstance(data, Examples) else Examples.from_blocks(data)


def padded(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Examples:
    """(ids, labels) rows of at most `seq_len` tokens, right-padded into one `Examples`."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        lengths[i] = len(row_ids)
    return Examples(ids, labels, lengths)


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch cut to its longest row: short records cost no compute on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
