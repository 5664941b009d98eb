"""What a client reports of its round: the part only it knows (`SaidByClient`, sealed inside
its update and parsed at the decode boundary), and the report the aggregator records
(`ClientReport`: that, with what the aggregator saw itself: the counts it checked, the object and
its size)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace

from fedlib.wire.decode import expect, malformed, parse_json


@dataclass(frozen=True)
class ClientReport:
    """What one client reports of its round (the aggregator records the accepted ones)."""

    client: str
    round: int
    num_examples: int
    train_loss: float | None  # None under secure aggregation: the aggregator learns no client's loss
    bytes_uploaded: int
    object_url: str
    train_s: float
    encrypt_upload_s: float
    update_norm: (
        float | None
    )  # L2 norm of the delta before any clipping (what DP's clip_norm is tuned against); None under secure aggregation
    local_steps: int = 0
    bytes_downloaded: int = (
        0  # what it read of the aggregator's store: the manifest, and the adapter or the broadcasts since the one it held
    )
    validation_loss: float | None = None  # the client's score of the adapter it received, on its own split
    validation_tokens: int = 0
    tokens_per_s: float = 0.0  # system metrics of the client's training, as it measured them
    peak_memory_mib: float = 0.0  # its process's peak resident set
    gpu_memory_mib: float = 0.0  # peak GPU memory torch allocated (0 on a CPU)
    cpu_util: float = 0.0  # process CPU seconds per wall second while training (2.0 = two cores busy)
    data_digest: str = (
        ""  # of the examples it trained on, keyed by a secret of the client's: which data, never the data, nor a way to confirm a guess
    )


_SAID_FLOATS = ("train_s", "encode_s")
_SAID_PRIVATE = ("train_loss", "update_norm")  # facts of the client's data: absent under secure aggregation
_SYSTEM = ("tokens_per_s", "peak_memory_mib", "gpu_memory_mib", "cpu_util")


def _digest(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16}|", value):
        raise malformed("client report", "data_digest is not 16 hex digits")
    return value


@dataclass(frozen=True)
class SaidByClient:
    """The part of a client's report only the client knows, sealed inside its update (the
    aggregator adds what it sees: the counts it checked, the object and its size). `encode_s`
    is the time from trained to sealed; the upload itself is timed by nobody the aggregator can
    trust, so it is not reported."""

    train_loss: float | None
    train_s: float
    encode_s: float
    update_norm: float | None
    bytes_downloaded: int = 0
    validation_loss: float | None = None
    validation_tokens: int = 0
    tokens_per_s: float = 0.0
    peak_memory_mib: float = 0.0
    gpu_memory_mib: float = 0.0
    cpu_util: float = 0.0
    data_digest: str = ""

    def to_json(self) -> str:
        """Compact: it rides in every update, and a compressed LoRA update is a few kB."""
        coarse = {"tokens_per_s": 1, "peak_memory_mib": 0, "gpu_memory_mib": 0, "cpu_util": 2}  # system metrics: what a chart shows
        fields_ = {k: round(v, coarse.get(k, 6)) if isinstance(v, float) else v for k, v in asdict(self).items()}
        fields_ |= {k: int(fields_[k]) for k, digits in coarse.items() if digits == 0}
        return json.dumps(fields_, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SaidByClient:
        """The decode boundary for a report: every field a finite, bounded number."""
        data = expect(parse_json(text or "", "client report", 4096, max_depth=1), dict, "client report")
        if set(data) != {f.name for f in fields(cls)}:
            raise malformed("client report", f"fields {sorted(data)[:10]}")

        def number(name: str, integer: bool = False, optional: bool = False):
            value = data[name]
            if value is None and optional:
                return None
            kinds = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not (0 <= value < 1e15):
                raise malformed("client report", f"{name} is not a number in [0, 1e15)")
            return value if integer else float(value)

        return cls(
            train_s=number("train_s"),
            encode_s=number("encode_s"),
            **{name: number(name, optional=True) for name in _SAID_PRIVATE},
            bytes_downloaded=number("bytes_downloaded", integer=True),
            validation_loss=number("validation_loss", optional=True),
            validation_tokens=number("validation_tokens", integer=True),
            **{name: number(name) for name in _SYSTEM},
            data_digest=_digest(data["data_digest"]),
        )

    def for_secure_aggregation(self) -> SaidByClient:
        """What the aggregator may learn of a client under secure aggregation: how it ran (time,
        bytes, memory), never a figure of its data (losses, the update's norm before clipping),
        which is what masking exists to hide."""
        return replace(self, train_loss=None, update_norm=None, validation_loss=None, validation_tokens=0)

    def report(self, client: str, round_number: int, examples: int, steps: int, url: str, size: int) -> ClientReport:
        return ClientReport(
            client=client,
            round=round_number,
            num_examples=examples,
            train_loss=self.train_loss,
            bytes_uploaded=size,
            object_url=url,
            train_s=self.train_s,
            encrypt_upload_s=self.encode_s,
            update_norm=self.update_norm,
            local_steps=steps,
            bytes_downloaded=self.bytes_downloaded,
            validation_loss=self.validation_loss,
            validation_tokens=self.validation_tokens,
            **{name: getattr(self, name) for name in _SYSTEM},
            data_digest=self.data_digest,
        )
