"""``RequestGuard``: the one ASGI middleware in front of everything the server answers, UI and API alike.

Each request passes these checks in order; the first that fails answers it:

1. **Host** (400): the ``Host`` header must name this server (``ui/hosts.py``), against DNS rebinding.
2. **Origin** (403): a request that carries an ``Origin`` must come from this server's own pages,
   against cross-site requests. Browsers send Origin on every POST and on cross-site reads; clients
   that are not browsers send none and pass.
3. **Network** (403): without ``--listen`` the API answers only this machine.
4. **Login** (401, or 429 while an address is backing off):
   - API paths, including ``/docs`` and ``/openapi.json``: HTTP Basic against the API's credentials.
   - everything else, with ``--auth``: Gradio's session cookie, except the login page and the files it
     needs to draw itself. ``POST /login`` passes through to Gradio, with its failures counted.
5. **Body size** (413) on API paths; Gradio limits its uploads itself.

The user a request proved is stored in its scope (``authenticated_user``), so handlers can give each
user only their own jobs.
"""
from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import Awaitable, Callable, Mapping

from starlette.datastructures import Headers

from .auth import Credentials, api_client_allowed, basic_auth_user
from .hosts import HostRules, same_origin, split_host_header
from .login_limiter import LoginLimiter

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
SessionLookup = Callable[[Mapping[str, str]], "str | None"]  # cookies → the logged-in user, or None

DEFAULT_MAX_BODY_BYTES = 50 * 1024 * 1024
API_PREFIXES = ("/sdapi/",)  # the extensions' own routes are added per server (``RequestGuard(api_prefixes=...)``)
API_DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
LOGIN_PATHS = ("/login", "/login/")
# What Gradio's login page loads before anyone has logged in (measured in Chromium).
LOGIN_PAGE_PATHS = ("/", "/theme.css", "/favicon.ico")
LOGIN_PAGE_PREFIXES = ("/assets/", "/static/")
USER_SCOPE_KEY = "sfumato.user"
_READ_METHODS = ("GET", "HEAD")


def is_api_path(path: str, extension_prefixes: tuple[str, ...] = ()) -> bool:
    """The A1111 API, its docs, or a route an extension added (``extension_prefixes``: their first path segments, "/name")."""
    if path.startswith(API_PREFIXES) or path in API_DOC_PATHS:
        return True
    return any(path == prefix or path.startswith(prefix + "/") for prefix in extension_prefixes)


def is_login_page(path: str, method: str) -> bool:
    """Paths a logged-out browser may fetch: the login page, its scripts, styles and fonts."""
    if path in LOGIN_PATHS:
        return method == "POST"
    return method in _READ_METHODS and (path in LOGIN_PAGE_PATHS or path.startswith(LOGIN_PAGE_PREFIXES))


def authenticated_user(scope: Mapping) -> str | None:
    """The user this request logged in as; None when the server has no logins for its path."""
    return scope.get(USER_SCOPE_KEY)


def client_address(scope: Mapping) -> str:
    client = scope.get("client") or ("unknown", 0)
    return str(client[0])


def _cookies(headers: Headers) -> dict[str, str]:
    jar = SimpleCookie()
    for header in headers.getlist("cookie"):
        try:
            jar.load(header)
        except Exception:  # noqa: BLE001 - a malformed cookie header proves nothing
            continue
    return {key: morsel.value for key, morsel in jar.items()}


async def refuse(scope, send, status: int, error: str, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer ``{"error", "detail"}`` with ``status``; a WebSocket handshake is closed instead (the server sends 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    payload = json.dumps({"error": error, "detail": detail}).encode("utf-8")
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())] + (headers or []),
    })
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """See the module docstring. ``ui_credentials`` None: the UI needs no login; ``api_credentials`` None: nor the API.

    ``session_user`` reads Gradio's session cookie; ``server.py`` hands it over once Gradio is mounted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: HostRules,
        listen: bool = False,
        api_credentials: Credentials | None = None,
        ui_credentials: Credentials | None = None,
        session_user: SessionLookup | None = None,
        limiter: LoginLimiter | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        api_prefixes: tuple[str, ...] = (),
    ):
        self.app = app
        self.hosts = hosts
        self.listen = listen
        self.api_credentials = api_credentials
        self.ui_credentials = ui_credentials
        self.session_user = session_user or (lambda _cookies: None)
        self.limiter = limiter or LoginLimiter()
        self.max_body_bytes = max_body_bytes
        self.api_prefixes = tuple(api_prefixes)  # where the extensions' routes live: guarded as the API is

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.hosts.allows_host(host):
            await refuse(scope, send, 400, "BadHost",
                         f"Host {host!r} is not a name this server answers to ({self.hosts.describe()}). "
                         f"If you reach Sfumato under that name, start it with --allowed-hosts {_bare_name(host)}")
            return
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, host):
            await refuse(scope, send, 403, "CrossOrigin",
                         f"refused a request from the page at {origin!r}: only Sfumato's own pages (at {host}) may send it")
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if is_api_path(path, self.api_prefixes):
            await self._api(scope, receive, send, headers)
        elif self.ui_credentials:
            await self._ui(scope, receive, send, headers, path, method)
        else:
            await self.app(scope, receive, send)

    # -- the API: Basic auth, then the body limit ----------------------------------------
    async def _api(self, scope, receive, send, headers: Headers) -> None:
        address = client_address(scope)
        if not api_client_allowed(address, self.listen):
            await refuse(scope, send, 403, "Forbidden", "the API answers only this machine; start Sfumato with --listen to allow other clients")
            return
        if self.api_credentials:
            user = await self._basic_user(scope, send, headers, address)
            if user is None:
                return
            scope[USER_SCOPE_KEY] = user
        await self._with_body_limit(scope, receive, send, headers)

    async def _basic_user(self, scope, send, headers: Headers, address: str) -> str | None:
        """The user an Authorization header proves; otherwise answers 401 (or 429 while backing off) and returns None."""
        header = headers.get("authorization")
        challenge = [(b"www-authenticate", b'Basic realm="Sfumato API"')]
        if header is None:
            await refuse(scope, send, 401, "Unauthorized", "this server needs a login: send HTTP Basic credentials", challenge)
            return None
        if await self._backing_off(scope, send, address):
            return None
        user = basic_auth_user(header, self.api_credentials)
        if user is None:
            self.limiter.failed(address)
            await refuse(scope, send, 401, "Unauthorized", "Incorrect username or password", challenge)
        return user

    async def _backing_off(self, scope, send, address: str) -> bool:
        wait = self.limiter.retry_after(address)
        if wait:
            await refuse(scope, send, 429, "TooManyFailedLogins",
                         f"too many wrong passwords from {address}; try again in {wait} s", [(b"retry-after", str(wait).encode())])
        return bool(wait)

    # -- the UI: Gradio's session, the login page, counted login attempts --------------------
    async def _ui(self, scope, receive, send, headers: Headers, path: str, method: str) -> None:
        if path in LOGIN_PATHS and method == "POST":
            await self._counted_login(scope, receive, send)
            return
        user = self.session_user(_cookies(headers))
        if user is None and not is_login_page(path, method):
            await refuse(scope, send, 401, "Unauthorized", "log in first: open the page at / and sign in")
            return
        scope[USER_SCOPE_KEY] = user
        await self.app(scope, receive, send)

    async def _counted_login(self, scope, receive, send) -> None:
        """Pass a login to Gradio unless its address is backing off; count the attempt if Gradio refuses it."""
        address = client_address(scope)
        if await self._backing_off(scope, send, address):
            return

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] in (400, 401):
                self.limiter.failed(address)
            await send(message)

        await self.app(scope, receive, watch)

    # -- body size ------------------------------------------------------------------------------
    async def _with_body_limit(self, scope, receive, send, headers: Headers) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        too_large = f"request body is larger than {self.max_body_bytes} bytes"
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    await refuse(scope, send, 413, "PayloadTooLarge", too_large)
                    return
            except ValueError:
                await refuse(scope, send, 400, "BadRequest", "invalid Content-Length")
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
                await refuse(scope, send, 413, "PayloadTooLarge", too_large)
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


def _bare_name(host: str | None) -> str:
    parsed = split_host_header(host or "")
    return parsed[0] if parsed else "NAME"
