"""Hosts for the drills and the benches: each party, store and server a Linux network namespace of its own, with
its own address, linked to one router namespace that stands for the network between clouds.

Why a router and not a bridge: the fence (which host may open a connection to which) is an
nftables forward chain in the router, as a cloud's security groups sit in its network and not
on the machines, and in the `inet` family a refused connection is answered at once (a bridge's
filter can only drop, and a dropped SYN costs the caller its whole connect timeout). A link is
shaped with a token bucket (`tc tbf`) on the host's side (its uplink) and on the router's side
(its downlink); a cut link is a fence rule too: every packet to or from the host is dropped,
and a new connection either way is answered "host unreachable", as when a machine's cloud
loses its route.

Needs root (CI runs as root). Every name made here starts with the network's prefix, and
`Network.close` removes them all; `Network.sweep` removes what a killed run left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROUTER_ADDRESS = "254"  # the last octet of the router's address on every link


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    """One machine: a namespace, its address, the link that joins it to the router."""

    name: str
    namespace: str
    address: str
    link: str  # the router's end of this host's veth

    def command(self, *command: str, user: str | None = None, env: Mapping[str, str] | None = None) -> list[str]:
        """`command` run on this host, as `user` (with only `env`) or as root (with the caller's environment)."""
        inside = list(command)
        if user is not None:
            inside = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in (env or {}).items()), *inside]
        elif env is not None:
            inside = ["env", *(f"{k}={v}" for k, v in env.items()), *inside]
        return ["ip", "netns", "exec", self.namespace, *inside] if self.namespace else inside

    def run(self, *command: str, user: str | None = None, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(*command, user=user, env=env), **kwargs)

    def spawn(
        self, *command: str, log: Path, user: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        """A long-running process on this host (a server, a worker), its output appended to `log`."""
        with open(log, "a") as out:
            return subprocess.Popen(
                self.command(*command, user=user, env=env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )

    def url(self, port: int, scheme: str = "http") -> str:
        return f"{scheme}://{self.address}:{port}"


@dataclass
class Network:
    """A router namespace and the hosts linked to it. `allow(a, b)` lets `a` open connections to
    `b` (their replies follow); everything else is refused by the router."""

    prefix: str = "fd"
    subnet: str = "10.77.0"
    hosts: dict[str, Host] = field(default_factory=dict)
    _allowed: set[tuple[str, str]] = field(default_factory=set)
    _cut: set[str] = field(default_factory=set)

    @property
    def router(self) -> str:
        return f"{self.prefix}-net"

    @property
    def router_address(self) -> str:
        return f"{self.subnet}.{ROUTER_ADDRESS}"

    def open(self) -> Network:
        self.sweep()
        _ip("netns", "add", self.router)
        self._router("sysctl", "-qw", "net.ipv4.ip_forward=1")
        _ip("-n", self.router, "link", "set", "lo", "up")
        self._fence()
        return self

    def add(self, name: str, *, root: bool = False) -> Host:
        """A host with the next address. With `root`, the caller's own namespace is the host
        (the test's process: the operator's laptop, which reaches only what it is allowed)."""
        number = len(self.hosts) + 1
        address = f"{self.subnet}.{number}"
        namespace = f"{self.prefix}-{name}"
        inner, outer = f"{self.prefix}{number}h", f"{self.prefix}{number}r"
        if root:
            subprocess.run(["ip", "link", "del", inner], capture_output=True)  # a killed run's, if its deletion lags
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer, "netns", self.router)
            _ip("addr", "add", f"{address}/32", "dev", inner)
            _ip("link", "set", inner, "up")
            _ip("route", "add", f"{self.subnet}.0/24", "via", self.router_address, "dev", inner, "onlink")
            namespace = ""
        else:
            _ip("netns", "add", namespace)
            _ip("link", "add", inner, "netns", namespace, "type", "veth", "peer", "name", outer, "netns", self.router)
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "link", "set", inner, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{address}/32", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "route", "add", "default", "via", self.router_address, "dev", "eth0", "onlink")
        _ip("-n", self.router, "addr", "add", f"{self.router_address}/32", "dev", outer)
        _ip("-n", self.router, "link", "set", outer, "up")
        _ip("-n", self.router, "route", "add", f"{address}/32", "dev", outer)
        host = Host(name, namespace, address, outer)
        self.hosts[name] = host
        return host

    def allow(self, source: Host, *targets: Host) -> None:
        for target in targets:
            self._allowed.add((source.address, target.address))
        self._fence()

    def _fence(self) -> None:
        # A cut host's packets are dropped, in flight or not (as on a lost route); a new
        # connection to or from it is answered unreachable at once.
        cut = [
            f"ip {side} {a} ct state new reject with icmpx type host-unreachable" for a in sorted(self._cut) for side in ("saddr", "daddr")
        ]
        cut += [f"ip {side} {a} drop" for a in sorted(self._cut) for side in ("saddr", "daddr")]
        rules = [f"ip saddr {a} ip daddr {b} accept" for a, b in sorted(self._allowed)]
        ruleset = "\n".join(
            [
                "flush ruleset",
                "table inet fence {",
                "  chain forward {",
                "    type filter hook forward priority 0; policy drop;",
                *(f"    {rule}" for rule in cut),
                "    ct state established,related accept",
                *(f"    {rule}" for rule in rules),
                "    reject with icmpx type admin-prohibited",
                "  }",
                "}",
            ]
        )
        subprocess.run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)

    def shape(self, host: Host, up_mbit: float, down_mbit: float | None = None) -> None:
        """A token bucket on each direction of the host's link: `up_mbit` leaving the host,
        `down_mbit` (the same unless given) reaching it."""
        assert host.namespace, "the caller's own namespace is not shaped"
        for where, dev, rate in (
            (["ip", "netns", "exec", host.namespace], "eth0", up_mbit),
            (["ip", "netns", "exec", self.router], host.link, down_mbit or up_mbit),
        ):
            burst = max(32_000, int(rate * 1e6 / 8 / 100))  # 10 ms of the rate, at least 32 kB
            subprocess.run(
                [
                    *where,
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{rate}mbit",
                    "burst",
                    str(burst),
                    "latency",
                    "200ms",
                ],
                check=True,
                capture_output=True,
            )

    def cut(self, host: Host) -> None:
        """The host's link goes down: it reaches nothing, and nothing reaches it."""
        self._cut.add(host.address)
        self._fence()

    def restore(self, host: Host) -> None:
        self._cut.discard(host.address)
        self._fence()

    def close(self) -> None:
        self.sweep()
        for number, host in enumerate(self.hosts.values(), 1):
            if not host.namespace:
                subprocess.run(["ip", "link", "del", f"{self.prefix}{number}h"], capture_output=True)
        self.hosts.clear()

    def sweep(self) -> None:
        """Remove every namespace of this prefix, this run's or a killed run's (its processes
        first); with the router's namespace go the links, and with them the caller's own end."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in names:
            if name.startswith(f"{self.prefix}-"):
                for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                    try:
                        os.kill(int(pid), 9)
                    except ProcessLookupError:
                        pass
                subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def _router(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.router, *command], check=True, capture_output=True)


def wait_for_port(address: str, port: int, timeout: float = 120, what: str = "") -> None:
    """Until something accepts on address:port (a server's readiness is its socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what or 'a server'} not listening on {address}:{port} after {timeout:.0f} s")


def reachable(host: Host, targets: Sequence[tuple[str, int]], timeout: float = 3.0) -> list[str]:
    """What `host` sees when it opens each `(address, port)`: "open", "refused", "unreachable" or
    "timeout", in order (one process on the host probes them all)."""
    probe = (
        "import json,socket,sys\n"
        "def see(a, p):\n"
        " s=socket.socket(); s.settimeout(float(sys.argv[1]))\n"
        " try:\n  s.connect((a, p)); return 'open'\n"
        " except ConnectionRefusedError: return 'refused'\n"
        " except TimeoutError: return 'timeout'\n"
        " except OSError as e: return 'unreachable' if e.errno in (101, 113) else f'error {e.errno}'\n"
        " finally: s.close()\n"
        "print(json.dumps([see(a, p) for a, p in json.loads(sys.argv[2])]))\n"
    )
    done = host.run("python3", "-c", probe, str(timeout), json.dumps([list(t) for t in targets]))
    if done.returncode != 0:
        raise RuntimeError(f"probing from {host.name} failed: {done.stderr}")
    return json.loads(done.stdout)
