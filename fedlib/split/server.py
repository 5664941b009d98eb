"""The server's side of split fine-tuning: the middle blocks, over HTTP on one host and port.

    python -m fedlib.split.server CONFIG --port PORT [--ready FILE]

It loads the public base weights, attaches LoRA, keeps only the middle slice and drops the
client's slices. Every request after `/hello` carries a sealed message of the session's channel
(`fedlib.split.channel`); a message that fails to open is answered 400 with its reason and
changes nothing. Several clients may hold sessions at once: they share the one middle, and
their steps are serialised.

    POST /hello                       JSON hello → JSON {session, attestation}
    POST /<session>/<mode>/forward    sealed activations → sealed middle output
    POST /<session>/<mode>/backward   sealed gradient at the top cut → sealed gradient at the bottom
    POST /<session>/calibrated        empty → fixes the server's SPF mask
    GET  /state                       the middle's LoRA and SPF as safetensors (the server's own)
mode is `calibrate`, `train` or `eval` (no graph kept, no backward).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from fedlib.config import FederationConfig, load_config
from fedlib.federation import keyring, load_global_model
from fedlib.rejection import UpdateRejected
from fedlib.serialization import tensors_to_bytes
from fedlib.split.attestation import NoTEE
from fedlib.split.channel import ChannelSide, server_accept
from fedlib.split.slicing import BlockStack, slice_model
from fedlib.split.trainer import SliceTrainer

log = logging.getLogger("fedlib.split.server")
MODES = ("calibrate", "train", "eval")


@dataclass
class _Session:
    channel: ChannelSide
    inputs: torch.Tensor | None = None  # the leaf the last forward started from
    outputs: torch.Tensor | None = None


@dataclass
class SplitServer:
    middle: BlockStack
    trainer: SliceTrainer
    sessions: dict[str, _Session] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attestor: NoTEE = field(default_factory=NoTEE)
    calibrated: bool = False

    @classmethod
    def from_config(cls, config: FederationConfig) -> SplitServer:
        model = load_global_model(config, None)
        middle = slice_model(model, config.split.cut).middle  # the client's slices are not kept
        return cls(middle, SliceTrainer({"middle": middle}, config.split))

    def hello(self, hello: dict, ring) -> dict:
        channel = server_accept(ring, hello)
        self.sessions[channel.session] = _Session(channel)
        return {"session": channel.session, "attestation": self.attestor.evidence(hello["session"])}

    def forward(self, session: str, mode: str, blob: bytes) -> bytes:
        s = self.sessions[session]
        with self.lock:
            hidden = s.channel.open(f"{mode}-activations", blob)["hidden"]
            if mode == "eval":
                with torch.no_grad():
                    return s.channel.seal("eval-output", {"hidden": self.middle(hidden)})
            if mode == "calibrate" and not self.trainer.scores:
                self.trainer.begin_calibration()
            s.inputs = hidden.requires_grad_()
            s.outputs = self.middle(s.inputs)
            return s.channel.seal(f"{mode}-output", {"hidden": s.outputs.detach()})

    def backward(self, session: str, mode: str, blob: bytes) -> bytes:
        s = self.sessions[session]
        with self.lock:
            grad = s.channel.open(f"{mode}-gradient", blob)["grad"]
            if s.outputs is None or s.inputs is None:
                raise RuntimeError("backward without a forward in this session")
            s.outputs.backward(grad)
            if mode == "calibrate":
                self.trainer.accumulate_scores()
            else:
                self.trainer.step()
            reply = s.channel.seal(f"{mode}-input-gradient", {"grad": s.inputs.grad})
            s.inputs = s.outputs = None
            return reply

    def finish_calibration(self) -> None:
        with self.lock:
            if not self.calibrated:  # the first client's calibration fixes the shared mask
                self.trainer.end_calibration()
                self.calibrated = True

    def state(self) -> bytes:
        with self.lock:
            return tensors_to_bytes(self.trainer.state())


def serve(config: FederationConfig, port: int, ready: Path | None = None) -> None:
    server_state = SplitServer.from_config(config)
    ring = keyring(config)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: bytes, kind: str = "application/octet-stream") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/state":
                self._reply(200, server_state.state())
            elif self.path == "/health":
                self._reply(200, b"ok", "text/plain")
            else:
                self._reply(404, b"")

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            parts = self.path.strip("/").split("/")
            try:
                if parts == ["hello"]:
                    self._reply(200, json.dumps(server_state.hello(json.loads(body), ring)).encode(), "application/json")
                elif len(parts) == 2 and parts[1] == "calibrated":
                    server_state.finish_calibration()
                    self._reply(200, b"{}", "application/json")
                elif len(parts) == 3 and parts[1] in MODES and parts[2] in ("forward", "backward"):
                    step = server_state.forward if parts[2] == "forward" else server_state.backward
                    self._reply(200, step(parts[0], parts[1], body))
                else:
                    self._reply(404, b"")
            except UpdateRejected as err:
                log.warning("split session %s: message rejected (%s): %s", parts[0], err.reason.value, err.detail)
                self._reply(400, json.dumps({"reason": err.reason.value, "detail": err.detail}).encode(), "application/json")
            except KeyError as err:
                self._reply(404, json.dumps({"reason": "unknown_session", "detail": str(err)}).encode(), "application/json")

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.address_string(), *args)  # requests at debug; rejections are warnings above

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if ready is not None:
        ready.write_text(str(httpd.server_address[1]))
    httpd.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="fedlib split fine-tuning server (the middle blocks)")
    parser.add_argument("config")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready", type=Path, help="write the bound port here once serving")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve(load_config(args.config), args.port, args.ready)


if __name__ == "__main__":
    main()
