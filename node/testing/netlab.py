"""A small internet in Linux network namespaces, for tests and benchmarks of NAT traversal.

    public  198.18.0.1   the "internet": a bridge, and the public daemons (bootstrap, relay, ...)
    r1      198.18.0.11  NAT router (iptables MASQUERADE) of   a 10.1.0.2
    r2      198.18.0.12  NAT router (iptables MASQUERADE) of   c 10.2.0.2

A router with `drop_unsolicited` behaves like a home router: inbound packets that belong to
no connection opened from inside are dropped, not answered. Needs root, iproute2 and
iptables; every namespace (and with it every veth and rule) is deleted on exit, also when
building failed half way. Only addresses inside these namespaces are used (198.18.0.0/15
is the range reserved for benchmarking networks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

__all__ = ["Host", "NatLab", "unavailable_reason"]

PUBLIC_IP = "198.18.0.1"


def _run(*cmd: str) -> None:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can): checked by making one."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    probe = f"mmprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (RuntimeError, OSError) as e:
        return f"cannot create a network namespace: {e}"
    try:
        _run("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n")
    except (RuntimeError, OSError) as e:
        return f"iptables NAT does not work in a namespace: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True)
class Host:
    netns: str
    ip: str

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd]


class NatLab:
    """The namespaces above; `lab.public`, `lab.a`, `lab.c` are where processes run."""

    def __init__(self, drop_unsolicited: tuple[bool, bool] = (False, True), prefix: str | None = None) -> None:
        self.prefix = prefix or f"mm{os.getpid() % 100000}"
        self.drop_unsolicited = drop_unsolicited
        p = self.prefix
        self.public = Host(f"{p}pub", PUBLIC_IP)
        self.a = Host(f"{p}a", "10.1.0.2")
        self.c = Host(f"{p}c", "10.2.0.2")
        self.routers = (Host(f"{p}r1", "198.18.0.11"), Host(f"{p}r2", "198.18.0.12"))
        self._made: list[str] = []

    def _ns(self, netns: str, *cmd: str) -> None:
        _run("ip", "netns", "exec", netns, *cmd)

    def _add(self, netns: str) -> None:
        _run("ip", "netns", "add", netns)
        self._made.append(netns)
        self._ns(netns, "ip", "link", "set", "lo", "up")

    def build(self) -> None:
        p, pub = self.prefix, self.public.netns
        for host in (self.public, *self.routers, self.a, self.c):
            self._add(host.netns)
        self._ns(pub, "ip", "link", "add", "br0", "type", "bridge")
        self._ns(pub, "ip", "addr", "add", f"{PUBLIC_IP}/24", "dev", "br0")
        self._ns(pub, "ip", "link", "set", "br0", "up")
        sites = zip(self.routers, (self.a, self.c), self.drop_unsolicited, strict=True)
        for i, (router, inside, drop) in enumerate(sites, 1):
            wan, port, lan, eth = f"{p}w{i}", f"{p}b{i}", f"{p}l{i}", f"{p}e{i}"
            _run("ip", "link", "add", wan, "netns", router.netns, "type", "veth", "peer", "name", port, "netns", pub)
            self._ns(pub, "ip", "link", "set", port, "master", "br0", "up")
            self._ns(router.netns, "ip", "addr", "add", f"{router.ip}/24", "dev", wan)
            self._ns(router.netns, "ip", "link", "set", wan, "up")
            _run(
                *("ip", "link", "add", lan, "netns", router.netns, "type", "veth"),
                *("peer", "name", eth, "netns", inside.netns),
            )
            gateway = inside.ip.rsplit(".", 1)[0] + ".1"
            self._ns(router.netns, "ip", "addr", "add", f"{gateway}/24", "dev", lan)
            self._ns(router.netns, "ip", "link", "set", lan, "up")
            self._ns(inside.netns, "ip", "addr", "add", f"{inside.ip}/24", "dev", eth)
            self._ns(inside.netns, "ip", "link", "set", eth, "up")
            self._ns(inside.netns, "ip", "route", "add", "default", "via", gateway)
            self._ns(router.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._ns(router.netns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE")
            if drop:
                for chain in ("FORWARD", "INPUT"):
                    self._ns(
                        router.netns,
                        *("iptables", "-A", chain, "-i", wan, "-m", "conntrack"),
                        *("--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"),
                    )
                    self._ns(router.netns, "iptables", "-A", chain, "-i", wan, "-j", "DROP")

    def remove(self) -> None:
        """Delete every namespace made (their veths and rules go with them)."""
        errors = []
        for netns in reversed(self._made):
            result = subprocess.run(["ip", "netns", "del", netns], capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(f"{netns}: {result.stderr.strip()}")
        self._made.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    def namespaces(self) -> list[str]:
        return list(self._made)

    def __enter__(self) -> NatLab:
        try:
            self.build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()
