"""S3, GCS and Azure Blob emulators on 127.0.0.1, for tests and for trying fedlib locally.

    .venv/bin/python scripts/emulators.py      # starts all three; prints the environment to use
    .venv/bin/python scripts/emulators.py -- .venv/bin/fedlib run configs/three-clouds-emulated.yaml
                                               # starts them, runs the command with that environment, stops them

S3 is moto's server and GCS is gcp-storage-emulator, both in this process; Azure is Azurite
from npm (`scripts/setup` installs it under .tools/), in a child process that persists to a
folder. Each handle can be stopped and started again on the same port, for outage drills.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same for every Azurite install; not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class S3Emulator:
    port: int = field(default_factory=free_port)
    _server: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Emulator:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # moto keeps state in memory: a restart empties every bucket
            self._server = None


@dataclass
class GCSEmulator:
    port: int = field(default_factory=free_port)
    _server: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GCSEmulator:
        from gcp_storage_emulator.server import create_server

        _keep_multipart_bytes()
        self._server = create_server("127.0.0.1", self.port, in_memory=True)
        self._server.start()
        wait_for_port(self.port)
        # gcsfs closes HEAD responses early; the emulator would print a BrokenPipe traceback each time.
        self._server._api._httpd.handle_error = lambda request, address: None
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def _keep_multipart_bytes() -> None:
    """The emulator parses multipart uploads (gcsfs's small objects, sent with bare-LF line breaks)
    with Python's email parser, which takes a trailing carriage return of the content for part of
    the line break: 1 object in 256 that ends in 0x0D lost its last byte (a 63-byte Ed25519
    signature, a truncated envelope). Real GCS keeps every byte, so the emulator is mended here:
    the content is cut from the raw body, up to the one line break before the closing boundary."""
    from gcp_storage_emulator import server

    if getattr(server, "_fedlib_exact_multipart", False):
        return
    decode, read = server._decode_raw_data, server._read_data

    def decode_and_keep(raw_data, request_handler):
        request_handler._fedlib_raw = decoded = decode(raw_data, request_handler)
        return decoded

    def read_exact(request_handler, query):
        data = read(request_handler, query)
        content_type = request_handler.headers.get("Content-Type") or ""
        raw = getattr(request_handler, "_fedlib_raw", None)
        if isinstance(data, dict) and "content" in data and content_type.startswith("multipart/related") and raw:
            delimiter = b"--" + content_type.split("boundary=", 1)[1].strip('"').encode()
            newline = b"\r\n" if raw[len(delimiter) : len(delimiter) + 2] == b"\r\n" else b"\n"
            part = raw.split(delimiter)[2]
            data["content"] = part.split(newline + newline, 1)[1][: -len(newline)]
        return data

    server._decode_raw_data, server._read_data, server._fedlib_exact_multipart = decode_and_keep, read_exact, True


def _die_with_parent() -> None:
    """In the child, before Azurite starts: the kernel sends it SIGTERM when this process dies,
    however it dies (a killed test run, a closed pipe), so no emulator outlives its owner."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class AzuriteEmulator:
    port: int = field(default_factory=free_port)
    location: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="azurite-")))
    _process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={self.url};"

    def start(self) -> AzuriteEmulator:
        binary = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is missing: run scripts/setup (it installs azurite from npm)")
        self._process = subprocess.Popen(
            [
                str(binary),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(self.location),
                "--silent",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--loose",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
            self._process = None


def environment(s3: S3Emulator, gcs: GCSEmulator, azure: AzuriteEmulator) -> dict[str, str]:
    """The providers' usual environment variables, pointed at the emulators."""
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_ENDPOINT_URL_S3": s3.url,
        "STORAGE_EMULATOR_HOST": gcs.url,
        "AZURE_STORAGE_CONNECTION_STRING": azure.connection_string,
    }


def main(argv: list[str]) -> int:
    """The ports match configs/three-clouds-emulated.yaml (override with FEDLIB_EMULATOR_PORTS)."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(
        prog="scripts/emulators.py",
        description="Start S3 (moto), GCS and Azure Blob (Azurite) emulators on 127.0.0.1 and print the environment that "
        "points the providers' SDKs at them; stop them on Ctrl-C. With `-- COMMAND`, run the command in that environment "
        "and stop them when it ends. Ports: FEDLIB_EMULATOR_PORTS (default 9100,9200,10000, as configs/three-clouds-emulated.yaml).",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: a command to run with the emulators up")
    command = parser.parse_args(argv).command
    command = command[1:] if command[:1] == ["--"] else command
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ports = [int(p) for p in os.environ.get("FEDLIB_EMULATOR_PORTS", "9100,9200,10000").split(",")]
    location = ROOT / ".fedlib" / "azurite"
    location.mkdir(parents=True, exist_ok=True)
    started: list = []
    try:
        started.append(S3Emulator(ports[0]).start())
        started.append(GCSEmulator(ports[1]).start())
        started.append(AzuriteEmulator(ports[2], location).start())
        s3, gcs, azure = started
        env = environment(s3, gcs, azure)
        print("Emulators up: S3", s3.url, "| GCS", gcs.url, "| Azure", azure.url, flush=True)
        if command:
            return subprocess.run(command, env={**os.environ, **env}).returncode
        print("Export these, then run: .venv/bin/fedlib run configs/three-clouds-emulated.yaml")
        for key, value in env.items():
            print(f"export {key}='{value}'", flush=True)
        for stop_on in (signal.SIGTERM, signal.SIGHUP):  # like Ctrl-C: a closed terminal, a kill
            signal.signal(stop_on, _interrupt)
        while True:
            signal.pause()
    except (KeyboardInterrupt, BrokenPipeError):  # BrokenPipe: whoever read our output went away
        pass
    finally:
        for emulator in reversed(started):
            emulator.stop()
        if os.environ.get("FEDLIB_EMULATOR_KEEP") != "1":
            shutil.rmtree(location, ignore_errors=True)
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
