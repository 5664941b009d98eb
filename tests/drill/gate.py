"""A gate in front of a drill's server (an object store, the MLflow server): a TCP forwarder that
reads each HTTP request's first line and, once armed, holds the first request that matches, so a
fault lands at an exact point of the protocol rather than at a moment guessed with a sleep.

    python gate.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT CONTROL_SOCKET

The drill talks to it over the Unix socket CONTROL_SOCKET (a file, so it crosses network
namespaces), one line each way:

    arm <fraction> <regex>   the next request whose first line matches is held after its head and
                             <fraction> of its body have gone through; the gate answers `armed`
    (the gate, once held)    hit <request line>
    release | drop           go on forwarding, or close both sides of the held connection

A request with a chunked body stops the sniffing on its connection (it is forwarded as it comes).
"""

from __future__ import annotations

import re
import socket
import sys
import threading

CHUNK = 65536


class Gate:
    def __init__(self) -> None:
        self.rule: tuple[re.Pattern[str], float] | None = None
        self.control: socket.socket | None = None
        self.lock = threading.Lock()

    def arm(self, pattern: str, fraction: float, control: socket.socket) -> None:
        with self.lock:
            self.rule, self.control = (re.compile(pattern), fraction), control

    def matches(self, line: str) -> tuple[float, socket.socket] | None:
        with self.lock:
            if self.rule is None or self.control is None or not self.rule[0].search(line):
                return None
            fraction, control = self.rule[1], self.control
            self.rule = None  # fires once
            return fraction, control


GATE = Gate()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _read_head(client: socket.socket, buffer: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buffer:
        data = client.recv(CHUNK)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _forward(client: socket.socket, upstream: socket.socket, buffer: bytes, count: int) -> bytes:
    """`count` bytes of the body to upstream, from `buffer` first; returns what is left over."""
    while count:
        if not buffer:
            buffer = client.recv(CHUNK)
            if not buffer:
                raise ConnectionResetError
        step = min(len(buffer), count)
        upstream.sendall(buffer[:step])
        buffer, count = buffer[step:], count - step
    return buffer


def _hold(line: str, control: socket.socket) -> None:
    """Tell the drill, and wait for its word."""
    control.sendall(f"hit {line}\n".encode())
    if control.makefile().readline().strip() != "release":
        raise ConnectionAbortedError


def _requests(client: socket.socket, upstream: socket.socket) -> None:
    """Client to upstream, one request at a time, holding the armed one."""
    buffer = b""
    try:
        while (read := _read_head(client, buffer)) is not None:
            head, buffer = read
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            upstream.sendall(head)
            if "chunked" in headers.get("transfer-encoding", ""):
                upstream.sendall(buffer)
                _pipe(client, upstream)
                return
            length = int(headers.get("content-length", "0"))
            held = GATE.matches(lines[0])
            if held is None:
                buffer = _forward(client, upstream, buffer, length)
                continue
            first = int(length * held[0])
            buffer = _forward(client, upstream, buffer, first)
            _hold(lines[0], held[1])
            buffer = _forward(client, upstream, buffer, length - first)
    except OSError:
        pass
    finally:
        for end in (client, upstream):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve_control(path: str) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    while True:
        control, _ = server.accept()
        line = control.makefile().readline().rstrip("\n").split(" ", 2)
        if len(line) == 3 and line[0] == "arm":
            GATE.arm(line[2], float(line[1]), control)
            control.sendall(b"armed\n")


def main(listen_host: str, listen_port: str, target_host: str, target_port: str, control_path: str) -> None:
    threading.Thread(target=_serve_control, args=(control_path,), daemon=True).start()
    listener = socket.create_server((listen_host, int(listen_port)), reuse_port=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection((target_host, int(target_port)))
        except OSError:
            client.close()
            continue
        threading.Thread(target=_requests, args=(client, upstream), daemon=True).start()
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main(*sys.argv[1:6])
