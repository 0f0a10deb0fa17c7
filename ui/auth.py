"""Who may log in and from where: credentials, HTTP Basic, the loopback rule.

- ``--auth user:pass`` (or ``--auth-file``) protects the UI and the API.
- ``--api-auth user:pass`` protects only the API, as in A1111.
- Without ``--listen`` the API answers only clients on this machine (loopback).

``ui/guard.py`` applies these rules to every request; the UI logs in through
Gradio's own login page (``gr.mount_gradio_app(auth=...)``), which browsers
handle better than a Basic prompt.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
from pathlib import Path
from secrets import compare_digest
from typing import Iterable

Credentials = list[tuple[str, str]]

LISTEN_WARNING = (
    "WARNING: --listen without --auth: anyone who can reach this machine on the network can use Sfumato, "
    "run generations and read your outputs. Add --auth user:password (or --auth-file FILE) to require a login."
)


class CredentialsError(ValueError):
    """A ``user:pass`` list or auth file that cannot be read."""


def parse_credentials(text: str) -> Credentials:
    """``"alice:pw1,bob:pw2"`` → ``[("alice", "pw1"), ("bob", "pw2")]`` (A1111's ``--gradio-auth`` format).

    The password may contain ':' (only the first one separates), not ','.
    """
    pairs: Credentials = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise CredentialsError(f"credentials must look like user:password, got {item.split(':')[0]!r}:...")
        pairs.append((user, password))
    if not pairs:
        raise CredentialsError("no user:password pair given")
    return pairs


def load_auth_file(path: str | Path) -> Credentials:
    """Credentials from a file with one ``user:password`` per line (or comma-separated); '#' starts a comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise CredentialsError(f"cannot read auth file {path}: {error.strerror or error}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return parse_credentials(",".join(lines))


def check_password(credentials: Iterable[tuple[str, str]], user: str, password: str) -> bool:
    """Constant-time comparison against every pair, so timing does not reveal which user exists."""
    ok = False
    for known_user, known_password in credentials:
        user_ok = compare_digest(user.encode("utf-8", "surrogatepass"), known_user.encode("utf-8", "surrogatepass"))
        password_ok = compare_digest(password.encode("utf-8", "surrogatepass"), known_password.encode("utf-8", "surrogatepass"))
        ok |= user_ok and password_ok
    return ok


def basic_auth_user(header: str | None, credentials: Credentials) -> str | None:
    """The user an ``Authorization: Basic ...`` header proves, or None."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user if check_password(credentials, user, password) else None


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything else, names included."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def api_client_allowed(host: str | None, listen: bool) -> bool:
    """The API's network rule: everyone with ``--listen``, only this machine without it."""
    return listen or is_loopback(host)


def listen_warning(listen: bool, auth: Credentials | None) -> str | None:
    """The warning to print prominently when the server is open to the network without a login."""
    return LISTEN_WARNING if listen and not auth else None
