"""The server's side of split fine-tuning: the middle blocks, over HTTP on one host and port
(its process: `python -m tasks.split_server CONFIG --port PORT [--ready FILE]`).

It loads the public base weights, attaches LoRA, keeps only the middle slice and drops the
client's slices. `/hello` opens a session only for a client that proves its key (see
`fedlib.split.channel`); every later request names a live session and carries a sealed message
of its channel, so nothing but `/health` answers a stranger. A message that fails to open is
answered with its reason and changes nothing. Sessions are capped (`split.max_sessions`), expire
when idle (`split.session_ttl_s`), and a session id is never opened twice; request bodies over
`split.max_body_bytes` are refused unread. Several clients may hold sessions at once: they share
the one middle, and their steps are serialised. Each client holds at most its share of the
sessions (`split.max_sessions` over the number of clients): its next hello retires its own least
recently used one, so one client's key, or a flood of its hellos, never locks another client out.
A hello answers a challenge the server issued moments before under a secret of this process, so
hellos recorded from an earlier run of the server open nothing on this one.

    POST /challenge                   (empty) → JSON {challenge}
    POST /hello                       JSON hello → JSON {session, server_nonce, server_ephemeral, attestation}
    POST /<session>/<mode>/forward    sealed activations → sealed middle output
    POST /<session>/<mode>/backward   sealed gradient at the top cut → sealed gradient at the bottom
    POST /<session>/calibrated        sealed "calibrated" → fixes the server's SPF mask
    POST /<session>/state             sealed "state-request" → the middle's LoRA and SPF, sealed
    GET  /health                      ok
mode is `calibrate`, `train` or `eval` (no graph kept, no backward).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import PreTrainedModel

from fedlib.config import SplitConfig
from fedlib.rejection import Reason, UpdateRejected
from fedlib.split.channel import ChannelSide, HelloChallenges, server_accept
from fedlib.split.slicing import BlockStack, slice_model
from fedlib.split.trainer import SliceTrainer
from fedlib.tee.evidence import Attestor, NoTEE
from fedlib.wire.decode import expect, parse_json
from fedlib.wire.keys import KeyRing

log = logging.getLogger("fedlib.split.server")
MODES = ("calibrate", "train", "eval")
_HTTP_STATUS = {Reason.TOO_LARGE: 413, Reason.UNKNOWN_SESSION: 404, Reason.TOO_MANY_SESSIONS: 503, Reason.SESSION_REUSED: 409}
_RETIRED_KEPT = 100_000  # session ids remembered after they close, so none is opened twice


@dataclass
class _Session:
    channel: ChannelSide
    last_used: float
    inputs: torch.Tensor | None = None  # the leaf the last forward started from
    outputs: torch.Tensor | None = None


@dataclass
class SplitServer:
    middle: BlockStack
    trainer: SliceTrainer
    ring: KeyRing
    limits: SplitConfig
    sessions: dict[str, _Session] = field(default_factory=dict)
    retired: OrderedDict[str, None] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attestor: Attestor = field(default_factory=NoTEE)
    challenges: HelloChallenges = field(default_factory=HelloChallenges)
    calibrated: bool = False
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def for_model(cls, model: PreTrainedModel, split: SplitConfig, ring: KeyRing) -> SplitServer:
        """The server's part of `model` (with LoRA attached): its middle slice; the client's
        slices are not kept."""
        middle = slice_model(model, split.cut).middle
        return cls(middle, SliceTrainer({"middle": middle}, split), ring, split)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self.sessions.items() if now - s.last_used > self.limits.session_ttl_s]:
            self._retire(sid)

    def _retire(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.retired[sid] = None
        while len(self.retired) > _RETIRED_KEPT:
            self.retired.popitem(last=False)

    @property
    def share(self) -> int:
        """How many sessions one client may hold: its part of `split.max_sessions`."""
        return max(1, self.limits.max_sessions // max(1, len(self.ring.client_public)))

    def challenge(self) -> dict:
        return {"challenge": self.challenges.issue(self.clock())}

    def hello(self, body: bytes) -> dict:
        hello = expect(parse_json(body, "hello", 4096, max_depth=1), dict, "hello")
        self.challenges.check(hello.get("challenge"), self.clock())  # a hello from an earlier server process stops here
        accepted = server_accept(self.ring, hello)  # refuses a hello without the client's proof
        channel = accepted.channel
        with self.lock:
            now = self.clock()
            self._expire(now)
            if channel.session in self.sessions or channel.session in self.retired:
                raise UpdateRejected(Reason.SESSION_REUSED, f"session {channel.session[:8]}… was opened before")
            held = sorted((s.last_used, sid) for sid, s in self.sessions.items() if s.channel.peer == channel.peer)
            for _, sid in held[: max(0, len(held) - self.share + 1)]:
                log.info("client %s holds its %d sessions: retiring its least recently used", channel.peer, self.share)
                self._retire(sid)
            if len(self.sessions) >= self.limits.max_sessions:
                raise UpdateRejected(Reason.TOO_MANY_SESSIONS, f"{len(self.sessions)} sessions open (split.max_sessions)")
            self.sessions[channel.session] = _Session(channel, now)
        return {
            "session": channel.session,
            "server_nonce": accepted.server_nonce,
            "server_ephemeral": accepted.server_ephemeral,
            "attestation": self.attestor.evidence(accepted.binding),
        }

    def _session(self, sid: str) -> _Session:
        """A live session, touched; the caller holds the lock."""
        now = self.clock()
        self._expire(now)
        session = self.sessions.get(sid)
        if session is None:
            raise UpdateRejected(Reason.UNKNOWN_SESSION, f"no open session {sid[:16]!r}")
        session.last_used = now
        return session

    def forward(self, sid: str, mode: str, blob: bytes) -> bytes:
        with self.lock:
            s = self._session(sid)
            hidden = s.channel.open(f"{mode}-activations", blob)["hidden"]
            if mode == "eval":
                with torch.no_grad():
                    return s.channel.seal("eval-output", {"hidden": self.middle(hidden)})
            if mode == "calibrate" and not self.trainer.scores:
                self.trainer.begin_calibration()
            s.inputs = hidden.requires_grad_()
            s.outputs = self.middle(s.inputs)
            return s.channel.seal(f"{mode}-output", {"hidden": s.outputs.detach()})

    def backward(self, sid: str, mode: str, blob: bytes) -> bytes:
        with self.lock:
            s = self._session(sid)
            grad = s.channel.open(f"{mode}-gradient", blob)["grad"]
            if s.outputs is None or s.inputs is None or grad.shape != s.outputs.shape:
                raise UpdateRejected(Reason.MALFORMED, "a gradient that matches no forward of this session")
            s.outputs.backward(grad)
            if mode == "calibrate":
                self.trainer.accumulate_scores()
            else:
                self.trainer.step()
            if s.inputs.grad is None:
                raise UpdateRejected(Reason.MALFORMED, "the gradient reached no input of this session's forward")
            reply = s.channel.seal(f"{mode}-input-gradient", {"grad": s.inputs.grad})
            s.inputs = s.outputs = None
            return reply

    def finish_calibration(self, sid: str, blob: bytes) -> bytes:
        with self.lock:
            s = self._session(sid)
            s.channel.open("calibrated", blob)
            if not self.calibrated:  # the first client's calibration fixes the shared mask
                self.trainer.end_calibration()
                self.calibrated = True
            return s.channel.seal("calibrated-ack", {})

    def state(self, sid: str, blob: bytes) -> bytes:
        with self.lock:
            s = self._session(sid)
            s.channel.open("state-request", blob)
            return s.channel.seal("state", self.trainer.state())


def http_server(server_state: SplitServer, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The HTTP front of `server_state`, bound but not yet serving."""
    limit = server_state.limits.max_body_bytes

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: bytes, kind: str = "application/octet-stream") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _refuse(self, err: UpdateRejected, sid: str) -> None:
            log.warning("split session %s: request refused (%s): %s", sid[:16], err.reason.value, err.detail)
            body = json.dumps({"reason": err.reason.value, "detail": err.detail}).encode()
            self._reply(_HTTP_STATUS.get(err.reason, 400), body, "application/json")

        def _body(self) -> bytes:
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                raise UpdateRejected(Reason.MALFORMED, "a request body needs a Content-Length")
            if int(length) > limit:
                self.close_connection = True  # unread: the rest of the body is not waited for
                raise UpdateRejected(Reason.TOO_LARGE, f"body of {length} bytes, limit {limit} (split.max_body_bytes)")
            return self.rfile.read(int(length))

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._reply(200, b"ok", "text/plain") if self.path == "/health" else self._reply(404, b"")

        def do_POST(self) -> None:  # noqa: N802
            parts = self.path.strip("/").split("/")
            try:
                body = self._body()
                if parts == ["challenge"]:
                    self._reply(200, json.dumps(server_state.challenge()).encode(), "application/json")
                elif parts == ["hello"]:
                    self._reply(200, json.dumps(server_state.hello(body)).encode(), "application/json")
                elif len(parts) == 2 and parts[1] == "calibrated":
                    self._reply(200, server_state.finish_calibration(parts[0], body))
                elif len(parts) == 2 and parts[1] == "state":
                    self._reply(200, server_state.state(parts[0], body))
                elif len(parts) == 3 and parts[1] in MODES and parts[2] in ("forward", "backward"):
                    step = server_state.forward if parts[2] == "forward" else server_state.backward
                    self._reply(200, step(parts[0], parts[1], body))
                else:
                    self._reply(404, b"")
            except UpdateRejected as err:
                self._refuse(err, parts[0])
            except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:  # e.g. a tensor the middle cannot take
                self._refuse(UpdateRejected(Reason.MALFORMED, f"{type(err).__name__}: {str(err)[:200]}"), parts[0])

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.address_string(), *args)  # requests at debug; refusals are warnings above

    return ThreadingHTTPServer((host, port), Handler)


def serve(server_state: SplitServer, port: int, ready: Path | None = None, host: str = "127.0.0.1") -> None:
    httpd = http_server(server_state, port, host)
    if ready is not None:
        ready.write_text(str(httpd.server_address[1]))
    httpd.serve_forever()
