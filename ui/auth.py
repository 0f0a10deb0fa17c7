"""Who may reach the server: credentials, HTTP Basic auth, the loopback rule, the body size limit.

- ``--auth user:pass`` (or ``--auth-file``) protects the UI and the API.
- ``--api-auth user:pass`` protects only the API, as in A1111.
- Without ``--listen`` the API answers only clients on this machine (loopback).

The API side is plain ASGI middleware so it guards every API route the same
way, including ones that extensions add. The UI side uses Gradio's own login
page (``gr.mount_gradio_app(auth=...)``), which browsers handle better than a
Basic prompt.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from secrets import compare_digest
from typing import Awaitable, Callable, Iterable

Credentials = list[tuple[str, str]]
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

API_PREFIXES = ("/sdapi/", "/controlnet/")
DEFAULT_MAX_BODY_BYTES = 50 * 1024 * 1024
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


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())] + (headers or []),
    })
    await send({"type": "http.response.body", "body": payload})


@dataclass
class ApiGuard:
    """ASGI middleware in front of the API paths: loopback rule, Basic auth, body size limit.

    ``credentials`` None means no login is required. Paths that are not API
    paths pass through untouched (Gradio guards the UI itself).
    """

    app: ASGIApp
    listen: bool = False
    credentials: Credentials | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_api_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or (None, None)
        if not api_client_allowed(client[0], self.listen):
            await _send_json(send, 403, {"error": "Forbidden", "detail": "the API answers only this machine; start Sfumato with --listen to allow other clients"})
            return
        if self.credentials:
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1") or None
            if basic_auth_user(header, self.credentials) is None:
                await _send_json(send, 401, {"error": "Unauthorized", "detail": "Incorrect username or password"},
                                 [(b"www-authenticate", b'Basic realm="Sfumato API"')])
                return
        await self._with_body_limit(scope, receive, send)

    async def _with_body_limit(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = {"error": "PayloadTooLarge", "detail": f"request body is larger than {self.max_body_bytes} bytes"}
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    await _send_json(send, 413, too_large)
                    return
            except ValueError:
                await _send_json(send, 400, {"error": "BadRequest", "detail": "invalid Content-Length"})
                return
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:  # read the whole body first (bounded), then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await _send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)


