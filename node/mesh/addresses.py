"""What a daemon listening on a wildcard host (0.0.0.0) tells others to dial: its real addresses.

A listener on 0.0.0.0 reports /ip4/0.0.0.0/... as its address; nobody can dial that, and
AutoNAT peers dialing it back find nothing. `advertised` replaces the wildcard by the host
named with `--announce-host`, or else by every IPv4 address of this machine's interfaces
(loopback last, so peers on the same machine still reach it).
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
from collections.abc import Sequence

__all__ = ["WILDCARDS", "advertised", "local_ipv4_addresses"]

WILDCARDS = ("0.0.0.0", "", "::")
_SIOCGIFCONF = 0x8912  # Linux: the configured addresses of every interface


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 interface addresses, loopback last (Linux; loopback alone elsewhere)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            buffer = array.array("B", b"\0" * 40 * 64)
            size = struct.unpack(
                "iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, struct.pack("iL", len(buffer), buffer.buffer_info()[0]))
            )[0]
    except OSError:
        return ["127.0.0.1"]
    raw = buffer.tobytes()[:size]
    found = [socket.inet_ntoa(raw[i + 20 : i + 24]) for i in range(0, size, 40)]
    return sorted(set(found), key=lambda a: (a.startswith("127."), a)) or ["127.0.0.1"]


def _protocol(host: str) -> str:
    try:
        socket.inet_aton(host)
    except OSError:
        return "dns4"  # a name, resolved by whoever dials
    return "ip4"


def advertised(multiaddrs: Sequence[str], announce_host: str | None, local: Sequence[str] | None = None) -> list[str]:
    """`multiaddrs` with /ip4/0.0.0.0 replaced by the announced host or by each local address."""
    out: list[str] = []
    for text in multiaddrs:
        prefix = "/ip4/0.0.0.0/"
        if not text.startswith(prefix):
            out.append(text)
            continue
        hosts = [announce_host] if announce_host else list(local if local is not None else local_ipv4_addresses())
        out.extend(f"/{_protocol(host)}/{host}/{text[len(prefix) :]}" for host in hosts)
    return list(dict.fromkeys(out))
