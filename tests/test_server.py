"""The server around UI and API: one port, logins, the loopback rule, the body size limit."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
import requests

from _api_fixtures import running_server
from ui.auth import CredentialsError, api_client_allowed, basic_auth_user, is_loopback, listen_warning, parse_credentials
from ui.server import create_server_app, parse_auth


@pytest.fixture
def bare_studio(tmp_path):
    """Enough of a Studio for endpoints that do not generate (samplers, schedulers, png-info)."""
    return SimpleNamespace(config=SimpleNamespace(outputs_dir=tmp_path / "outputs"), extensions=None)


def stub_ui(_studio):
    import gradio as gr

    with gr.Blocks() as blocks:
        gr.Markdown("Sfumato test UI")
    return blocks


def call(app, method: str, path: str, client: str = "127.0.0.1", **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await http.request(method, path, **kwargs)
    return asyncio.run(go())


# --- who may connect ----------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.168.1.20", False), ("10.0.0.1", False), ("::ffff:8.8.8.8", False), ("localhost.evil.com", False), ("", False), (None, False),
])
def test_only_loopback_addresses_count_as_this_machine(host, loopback):
    assert is_loopback(host) is loopback
    assert api_client_allowed(host, listen=False) is loopback
    assert api_client_allowed(host, listen=True) is True


def test_api_refuses_other_machines_without_listen_and_serves_them_with_it(bare_studio):
    closed = create_server_app(bare_studio, api=True, listen=False, ui_builder=False)
    refused = call(closed, "GET", "/sdapi/v1/samplers", client="192.168.1.20")
    assert refused.status_code == 403 and "--listen" in refused.json()["detail"]
    assert call(closed, "GET", "/sdapi/v1/samplers", client="127.0.0.1").status_code == 200
    opened = create_server_app(bare_studio, api=True, listen=True, ui_builder=False)
    assert call(opened, "GET", "/sdapi/v1/samplers", client="192.168.1.20").status_code == 200


def test_listen_without_auth_gives_a_warning_to_print():
    assert "WARNING" in listen_warning(True, None) and "--auth" in listen_warning(True, None)
    assert listen_warning(True, [("u", "p")]) is None
    assert listen_warning(False, None) is None


# --- credentials ----------------------------------------------------------------------

def test_credentials_parse_from_flags_and_files(tmp_path):
    assert parse_credentials("alice:pw1, bob:p:w:2") == [("alice", "pw1"), ("bob", "p:w:2")]
    auth_file = tmp_path / "auth.txt"
    auth_file.write_text("# the studio\ncarol:secret\n\ndave:x,erin:y\n")
    assert parse_auth("alice:pw1", auth_file) == [("alice", "pw1"), ("carol", "secret"), ("dave", "x"), ("erin", "y")]
    assert parse_auth(None, None) is None
    for bad in ("nocolon", ":nouser", "user:", ""):
        with pytest.raises(CredentialsError):
            parse_credentials(bad)
    with pytest.raises(CredentialsError, match="cannot read"):
        parse_auth(None, tmp_path / "missing.txt")


def test_basic_header_must_match_a_known_pair():
    import base64

    pairs = [("u", "p"), ("v", "q")]
    header = lambda text: "Basic " + base64.b64encode(text.encode()).decode()  # noqa: E731
    assert basic_auth_user(header("v:q"), pairs) == "v"
    for wrong in (header("u:q"), header("u"), "Basic !!!", "Bearer abc", None, header("x:p")):
        assert basic_auth_user(wrong, pairs) is None


def test_api_auth_protects_the_api_and_not_the_ui(bare_studio):
    app = create_server_app(bare_studio, api=True, api_auth=[("bot", "token")], ui_builder=False)
    denied = call(app, "GET", "/sdapi/v1/samplers")
    assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Basic")
    assert call(app, "GET", "/sdapi/v1/samplers", auth=("bot", "wrong")).status_code == 401
    assert call(app, "GET", "/sdapi/v1/samplers", auth=("bot", "token")).status_code == 200
    assert call(app, "GET", "/").status_code == 200


def test_auth_protects_ui_and_api_on_one_port(bare_studio):
    with running_server(bare_studio, api=True, auth=[("artist", "pw")], ui_builder=stub_ui) as server:
        assert requests.get(server.url + "/sdapi/v1/samplers", timeout=10).status_code == 401
        assert requests.get(server.url + "/sdapi/v1/samplers", auth=("artist", "pw"), timeout=10).status_code == 200
        assert requests.get(server.url + "/config", timeout=10).status_code == 401  # Gradio's app config needs the login
        session = requests.Session()
        assert session.post(server.url + "/login", data={"username": "artist", "password": "nope"}, timeout=10).status_code != 200
        assert session.post(server.url + "/login", data={"username": "artist", "password": "pw"}, timeout=10).status_code == 200
        config = session.get(server.url + "/config", timeout=10)
        assert config.status_code == 200 and "Sfumato test UI" in config.text
        assert requests.get(server.url + "/docs", timeout=10).status_code == 401  # the API's description needs the login too
        assert requests.get(server.url + "/docs", auth=("artist", "pw"), timeout=10).status_code == 200


def test_without_api_flag_the_api_is_not_served(bare_studio):
    app = create_server_app(bare_studio, api=False, ui_builder=False)
    assert call(app, "GET", "/sdapi/v1/samplers").status_code == 404


# --- request size -------------------------------------------------------------------

def test_oversized_api_bodies_get_413(bare_studio):
    app = create_server_app(bare_studio, api=True, ui_builder=False, max_body_bytes=10_000)
    big = {"image": "A" * 20_000}
    assert call(app, "POST", "/sdapi/v1/png-info", json=big).status_code == 413

    async def chunks():  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b"A" * 1000
    assert call(app, "POST", "/sdapi/v1/png-info", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    assert call(app, "POST", "/sdapi/v1/png-info", json={"image": ""}).status_code == 200


def test_stopped_server_frees_its_port_and_a_taken_port_is_reported(bare_studio):
    from ui.server import serve

    with running_server(bare_studio, api=True) as server:
        with pytest.raises(OSError, match="could not start"):
            serve(bare_studio, host="127.0.0.1", port=server.port, api=True, ui_builder=False, block=False)
        port = server.port
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=2)


def test_extension_routes_are_guarded_and_a_broken_extension_is_skipped(bare_studio):
    def broken(_app, _studio):
        raise RuntimeError("boom")

    def good(app, _studio):
        @app.get("/controlnet/ping")
        def ping() -> dict:
            return {"ok": True}

    bare_studio.extensions = SimpleNamespace(loaded={"broken": SimpleNamespace(api_routes=broken), "good": SimpleNamespace(api_routes=good)})
    app = create_server_app(bare_studio, api=True, api_auth=[("u", "p")], ui_builder=False)
    assert call(app, "GET", "/controlnet/ping").status_code == 401
    assert call(app, "GET", "/controlnet/ping", auth=("u", "p")).json() == {"ok": True}
    assert call(app, "GET", "/sdapi/v1/samplers", auth=("u", "p")).status_code == 200
