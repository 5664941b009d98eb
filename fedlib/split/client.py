"""The client's side of split fine-tuning: embeddings, the first blocks and the LM head, with
the text and the labels, talking to the server's middle over the sealed channel."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import torch
from torch import nn

from fedlib.config import SplitConfig
from fedlib.rejection import Reason, UpdateRejected
from fedlib.split.attestation import check_attestation
from fedlib.split.channel import client_hello, server_ephemeral_of
from fedlib.split.slicing import causal_lm_loss, slice_model
from fedlib.split.trainer import SliceTrainer, Tensors
from fedlib.wire.decode import expect, parse_json
from fedlib.wire.keys import KeyRing


@dataclass
class HttpTransport:
    """POSTs to the server; keeps what crossed the wire so tests and benchmarks can inspect it."""

    base_url: str
    timeout_s: float
    wire: list[bytes] = field(default_factory=list)
    keep_wire: bool = False
    max_reply_bytes: int = 64 << 20

    def post(self, path: str, body: bytes, json_body: bool = False) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method="POST")
        request.add_header("Content-Type", "application/json" if json_body else "application/octet-stream")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = response.read(self.max_reply_bytes + 1)
        except urllib.error.HTTPError as err:
            try:
                detail = expect(parse_json(err.read(4096) or b"{}", "refusal", 4096, max_depth=1), dict, "refusal")
            except UpdateRejected:
                detail = {}
            reason = Reason(detail["reason"]) if detail.get("reason") in Reason._value2member_map_ else Reason.MALFORMED
            raise UpdateRejected(reason, f"server refused {path}: {str(detail.get('detail', err.reason))[:300]}") from None
        if len(reply) > self.max_reply_bytes:
            raise UpdateRejected(Reason.TOO_LARGE, f"server reply to {path} is over {self.max_reply_bytes} bytes")
        if self.keep_wire:
            self.wire += [body, reply]
        return reply


@dataclass(frozen=True)
class StepStats:
    loss: float
    bytes: int  # sealed bytes both ways
    seconds: float


class SplitClient:
    def __init__(self, model: nn.Module, split: SplitConfig, ring: KeyRing, client: str, transport: HttpTransport) -> None:
        """`model`: the base model with LoRA attached; the client keeps its front and head."""
        slices = slice_model(model, split.cut)
        self.front, self.head = slices.front, slices.head
        self.trainer = SliceTrainer({"front": self.front, "head": self.head}, split)
        self.transport = transport
        issued = expect(parse_json(transport.post("/challenge", b""), "challenge answer", 1024, max_depth=1), dict, "challenge answer")
        hello, pending = client_hello(ring, client, expect(issued.get("challenge"), str, "challenge"))
        answer = expect(
            parse_json(transport.post("/hello", json.dumps(hello).encode(), json_body=True), "hello answer", 1 << 16), dict, "hello answer"
        )
        if answer.get("session") != hello["session"] or not isinstance(answer.get("server_nonce"), str):
            raise UpdateRejected(Reason.WRONG_SESSION, "the server answered for another session")
        nonce, server_ephemeral = answer["server_nonce"], server_ephemeral_of(answer)
        # Before anything is sent: with split.require_tee, evidence bound to this very session and
        # to the key the server drew for it, inside its TEE.
        check_attestation(answer.get("attestation"), pending.binding(nonce, server_ephemeral), split)
        self.channel = pending.finish(nonce, server_ephemeral)

    def _exchange(self, mode: str, ids: torch.Tensor) -> StepStats:
        started, sent_before = time.perf_counter(), self.channel.bytes_sent
        session = self.channel.session
        with torch.set_grad_enabled(mode != "eval"):
            hidden = self.front(ids)
        reply = self.transport.post(f"/{session}/{mode}/forward", self.channel.seal(f"{mode}-activations", {"hidden": hidden.detach()}))
        received = len(reply)
        middle = self.channel.open(f"{mode}-output", reply)["hidden"]
        if mode == "eval":
            with torch.no_grad():
                loss = causal_lm_loss(self.head(middle), ids)
            return StepStats(loss.item(), self.channel.bytes_sent - sent_before + received, time.perf_counter() - started)
        middle.requires_grad_()
        loss = causal_lm_loss(self.head(middle), ids)
        loss.backward()
        assert middle.grad is not None  # the loss was taken through it just above
        reply = self.transport.post(f"/{session}/{mode}/backward", self.channel.seal(f"{mode}-gradient", {"grad": middle.grad}))
        received += len(reply)
        grad = self.channel.open(f"{mode}-input-gradient", reply)["grad"]
        if hidden.requires_grad:
            hidden.backward(grad)
        if mode == "calibrate":
            self.trainer.accumulate_scores()
        else:
            self.trainer.step()
        return StepStats(loss.item(), self.channel.bytes_sent - sent_before + received, time.perf_counter() - started)

    def calibrate(self, batches: list[torch.Tensor], shared_mask: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Score both sides' SPF candidates on `batches`, then fix the masks. With
        `shared_mask` (another client's), this client's side reuses it."""
        self.trainer.begin_calibration()
        for batch in batches:
            self._exchange("calibrate", batch)
        reply = self.transport.post(f"/{self.channel.session}/calibrated", self.channel.seal("calibrated", {}))
        self.channel.open("calibrated-ack", reply)
        if shared_mask is not None:
            for layer in self.trainer.candidates.values():
                layer.weight.requires_grad_(False)
            self.trainer.use_mask(shared_mask)
            return shared_mask
        return self.trainer.end_calibration()

    def train_step(self, batch: torch.Tensor) -> StepStats:
        return self._exchange("train", batch)

    def eval_loss(self, blocks: torch.Tensor, batch_size: int) -> float:
        total = 0.0
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            total += self._exchange("eval", batch).loss * len(batch)
        return total / len(blocks)

    def state(self) -> Tensors:
        return self.trainer.state()

    def server_state(self) -> Tensors:
        """The server's trained part (its LoRA and SPF), over this session's channel."""
        reply = self.transport.post(f"/{self.channel.session}/state", self.channel.seal("state-request", {}))
        return self.channel.open("state", reply)

    def load_state(self, state: Tensors) -> None:
        self.trainer.load_state(state)
