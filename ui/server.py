"""One server, one port: the Gradio UI at ``/`` and, with ``--api``, the A1111 API beside it.

    FastAPI app ── RequestGuard (Host, Origin, loopback rule, logins and their back-off, body limit)
                       ├── /sdapi/v1/*, the extensions' routes, /docs, /openapi.json
                       └── Gradio Blocks mounted at "/" (Gradio's login page when --auth is set)

``create_server_app`` builds the ASGI app; ``serve`` runs it with uvicorn in a
background thread and returns a handle (``url``, ``wait()``, ``stop()``) that
the command line and the tests share.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fastapi import FastAPI

from .auth import Credentials, CredentialsError, listen_warning, load_auth_file, parse_credentials
from .guard import DEFAULT_MAX_BODY_BYTES, RequestGuard
from .hosts import HostRules, parse_allowed_hosts

log = logging.getLogger("sfumato.server")

__all__ = ["ServerHandle", "create_server_app", "listen_warning", "parse_allowed_hosts", "parse_auth", "serve", "CredentialsError"]

UiBuilder = Callable[[Any], Any]
STARTUP_TIMEOUT_S = 60.0


def parse_auth(text: str | None, auth_file: str | Path | None) -> Credentials | None:
    """``--auth user:pass[,user2:pass2]`` and ``--auth-file FILE`` together; None when neither is given.

    Raises CredentialsError (a ValueError) with a one-line message on a malformed pair or unreadable file.
    """
    pairs: Credentials = []
    if text:
        pairs += parse_credentials(text)
    if auth_file:
        pairs += load_auth_file(auth_file)
    return pairs or None


def _default_ui_builder() -> UiBuilder:
    from ui.app import build_app  # imported lazily: the API works without the UI module

    return build_app


def create_server_app(
    studio,
    *,
    api: bool,
    auth: Credentials | None = None,
    listen: bool = False,
    api_auth: Credentials | None = None,
    ui_builder: UiBuilder | None | bool = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    bind_host: str | None = None,
    allowed_hosts: Iterable[str] = (),
) -> FastAPI:
    """The ASGI app serving the UI and (when ``api``) the A1111 API on one port.

    - ``auth`` protects the UI (Gradio login) and the API (HTTP Basic).
    - ``api_auth`` protects the API only; when given it replaces ``auth`` for the API.
    - Without ``listen`` the API refuses clients that are not on this machine (403).
    - ``ui_builder``: ``None`` uses ``ui.app.build_app``; ``False`` serves no UI
      (the API alone); any callable ``builder(studio) -> gr.Blocks`` is used as is.
    - API request bodies above ``max_body_bytes`` get 413.
    - Requests must name this server in ``Host``: the loopback names, ``bind_host`` (default
      ``server_name``), the machine's own names with ``listen``, and ``allowed_hosts`` (``"*"``: any).
      Requests from another site's pages (a foreign ``Origin``) are refused. See ``ui/guard.py``.
    """
    app = FastAPI(
        title="Sfumato",
        description="Sfumato's AUTOMATIC1111-compatible HTTP API (/sdapi/v1) and its extensions' endpoints.",
        version="1.10-compatible",
        docs_url="/docs" if api else None,
        redoc_url=None,
        openapi_url="/openapi.json" if api else None,
    )
    if api:
        from .api import install_api

        app.state.sdapi = install_api(app, studio)
    sessions = _GradioSessions()
    hosts = HostRules.for_binding(bind_host or server_name, listen, allowed_hosts)
    app.add_middleware(RequestGuard, hosts=hosts, listen=listen, api_credentials=api_auth or auth, ui_credentials=auth,
                       session_user=sessions.user, max_body_bytes=max_body_bytes,
                       api_prefixes=getattr(app.state, "extension_api_prefixes", ()))

    builder = _default_ui_builder() if ui_builder is None else ui_builder
    if builder is False:
        _add_api_only_root(app, api)
        return app
    import gradio as gr

    from .style import FOOTER_LINKS

    blocks = builder(studio)
    outputs_dir = Path(studio.config.outputs_dir).resolve()
    app = gr.mount_gradio_app(
        app, blocks, path="/", auth=auth, server_name=server_name, server_port=server_port,
        allowed_paths=[str(outputs_dir)], max_file_size=max_body_bytes, show_error=True, footer_links=FOOTER_LINKS,
    )
    sessions.attach(app)
    return app


class _GradioSessions:
    """Who a Gradio session cookie belongs to, read from the mounted Gradio app's own login tokens.

    Gradio names its cookies after a per-app id and keeps token → user in memory; reading them here lets
    the guard put every Gradio route behind the login, not only the ones Gradio checks itself.
    """

    def __init__(self) -> None:
        self._gradio_app: Any = None

    def attach(self, app: FastAPI) -> None:
        from gradio.routes import App

        self._gradio_app = next((route.app for route in app.routes if isinstance(getattr(route, "app", None), App)), None)
        if self._gradio_app is None:
            raise RuntimeError("the Gradio app was not mounted; the UI's login cannot be checked")

    def user(self, cookies: Mapping[str, str]) -> str | None:
        gradio_app = self._gradio_app
        if gradio_app is None:
            return None
        token = cookies.get(f"access-token-{gradio_app.cookie_id}") or cookies.get(f"access-token-unsecure-{gradio_app.cookie_id}")
        return gradio_app.tokens.get(token) if token else None


def _add_api_only_root(app: FastAPI, api: bool) -> None:
    from fastapi.responses import PlainTextResponse

    text = "Sfumato is serving its API only; see /docs." if api else "Sfumato: no UI and no API enabled."

    @app.get("/", include_in_schema=False)
    def root() -> PlainTextResponse:
        return PlainTextResponse(text)


@dataclass
class ServerHandle:
    """A running server: its address, and how to wait for it or stop it."""

    url: str
    host: str
    port: int
    server: Any = field(repr=False)
    thread: threading.Thread = field(repr=False)
    app: FastAPI = field(repr=False)

    def wait(self) -> None:
        """Block until the server stops (Ctrl+C raises KeyboardInterrupt here)."""
        while self.thread.is_alive():
            self.thread.join(0.5)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def serve(
    studio,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    api: bool = False,
    auth: Credentials | None = None,
    api_auth: Credentials | None = None,
    listen: bool = False,
    ui_builder: UiBuilder | None | bool = None,
    block: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "warning",
    allowed_hosts: Iterable[str] = (),
) -> ServerHandle:
    """Start uvicorn in a background thread and return once it accepts connections.

    ``port=0`` picks a free port (the handle tells which). With ``block`` the
    call then waits until the server stops, stopping it cleanly on Ctrl+C.
    Raises OSError when the server cannot start (e.g. the port is taken).
    """
    import uvicorn

    app = create_server_app(studio, api=api, auth=auth, listen=listen, api_auth=api_auth, ui_builder=ui_builder,
                            max_body_bytes=max_body_bytes, server_name=_client_host(host), server_port=port,
                            bind_host=host, allowed_hosts=allowed_hosts)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sfumato-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"could not start the server on {host}:{port} (is the port already in use?)")
        time.sleep(0.02)
    bound_port = port
    for running in getattr(server, "servers", []) or []:
        for sock in running.sockets:
            bound_port = sock.getsockname()[1]
            break
    handle = ServerHandle(f"http://{_client_host(host)}:{bound_port}", host, bound_port, server, thread, app)
    if block:
        try:
            handle.wait()
        except KeyboardInterrupt:
            handle.stop()
    return handle
