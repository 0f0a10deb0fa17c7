"""Which Host and Origin headers belong to this server.

Two browser attacks reach a server on 127.0.0.1 although it is not on the internet:

- **DNS rebinding**: a page on ``evil.example`` makes its own name resolve to
  127.0.0.1 and then reads and drives the server as "same-origin". Its requests
  carry ``Host: evil.example``, so a server that answers only the names it is
  bound to is immune.
- **Cross-site requests**: any page can POST to ``http://127.0.0.1:7860`` (a
  "simple" request needs no CORS preflight). The browser says where the request
  comes from in the ``Origin`` header, so a server that refuses foreign Origins
  is immune; clients that are not browsers send no Origin and are unaffected.

The names come from how the server is bound: the loopback names always, the
machine's own names and addresses with ``--listen``, and whatever the user lists
with ``--allowed-hosts``.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from .auth import is_loopback

log = logging.getLogger("sfumato.hosts")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_HOST = "*"
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise_name(name: str) -> str:
    """``"LocalHost."`` → ``"localhost"``, ``"[::1]"`` → ``"::1"``, ``"::ffff:127.0.0.1"`` → ``"::ffff:7f00:1"``."""
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name.split("%")[0]))
    except ValueError:
        return name


def split_host_header(value: str) -> tuple[str, int | None] | None:
    """``Host`` header → (normalised name, port or None); None when it cannot be a host at all."""
    value = value.strip()
    if not value or any(char.isspace() or char in "/\\@?#" for char in value):
        return None
    try:
        parts = urlsplit(f"//{value}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    return (normalise_name(name), port) if name else None


def machine_names() -> set[str]:
    """This machine's host names and the addresses of its network interfaces, as a LAN client would type them."""
    names: set[str] = set()
    hostname = socket.gethostname()
    for name in (hostname, f"{hostname}.local", socket.getfqdn()):
        if name:
            names.add(normalise_name(name))
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(normalise_name(address.address))
    except Exception:  # noqa: BLE001 - no psutil or no permission: fall back to what the resolver knows
        log.debug("could not list the network interfaces", exc_info=True)
    try:
        for info in socket.getaddrinfo(hostname, None):
            names.add(normalise_name(str(info[4][0])))
    except OSError:
        pass
    return names


def parse_allowed_hosts(text: str | None) -> list[str]:
    """``--allowed-hosts "studio.lan, 192.168.1.20"`` → ``["studio.lan", "192.168.1.20"]``; ``*`` allows any Host."""
    if not text:
        return []
    hosts = [part.strip() for part in text.split(",") if part.strip()]
    for host in hosts:
        if host != ANY_HOST and split_host_header(host) is None:
            raise ValueError(f"--allowed-hosts: {host!r} is not a host name or address")
    return hosts


@dataclass(frozen=True)
class HostRules:
    """The names this server answers to (``names``), or any name when ``any_host``."""

    names: frozenset[str]
    any_host: bool = False

    @classmethod
    def for_binding(cls, bind_host: str, listen: bool, extra: Iterable[str] = ()) -> "HostRules":
        """Loopback names always; the bound address; the machine's own names with ``listen``; then ``extra``."""
        names = {normalise_name(name) for name in LOOPBACK_NAMES}
        if bind_host not in _WILDCARD_BINDS:
            names.add(normalise_name(bind_host))
        if listen or bind_host in _WILDCARD_BINDS:
            names |= machine_names()
        extra = list(extra)
        names |= {normalise_name(split_host_header(host)[0]) for host in extra if host != ANY_HOST}
        return cls(names=frozenset(names), any_host=ANY_HOST in extra)

    def allows_host(self, header: str | None) -> bool:
        """True when a request's ``Host`` header names this server. A missing Host (HTTP/1.0) cannot come from a browser."""
        if header is None:
            return True
        parsed = split_host_header(header)
        if parsed is None:
            return False
        name, _port = parsed
        return self.any_host or name in self.names or is_loopback(name)  # an address typed as such is never a rebinding name

    def describe(self) -> str:
        return "any host" if self.any_host else ", ".join(sorted(self.names))


def same_origin(origin: str, host_header: str | None) -> bool:
    """True when a browser's ``Origin`` is the very server that ``Host`` names (scheme's default port filled in).

    ``Origin: null`` (sandboxed frames, local files, redirects across sites) is never this server.
    """
    if not host_header or origin.strip().lower() == "null":
        return False
    try:
        parts = urlsplit(origin.strip())
        origin_name, origin_port = parts.hostname, parts.port
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if not origin_name or scheme not in _DEFAULT_PORTS:
        return False
    host = split_host_header(host_header)
    if host is None:
        return False
    default_port = _DEFAULT_PORTS[scheme]
    host_name, host_port = host
    return normalise_name(origin_name) == host_name and (origin_port or default_port) == (host_port or default_port)
