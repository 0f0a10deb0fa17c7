"""Who may drive the server, over real HTTP on 127.0.0.1: Host names, foreign pages, logins and their back-off,
and each logged-in user's view of the queue."""
from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from _api_fixtures import MODEL, decode_b64, make_studio, running_server

TIMEOUT = 10
STATE_CHANGING = ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints")


def stub_ui(_studio):
    import gradio as gr

    with gr.Blocks() as blocks:
        text = gr.Textbox(elem_id="words")
        gr.Button("Go", elem_id="go").click(lambda words: words.upper(), text, text, api_name="shout")
    return blocks


class RecordingJobs:
    """A queue with one running job that records what was done to it, for endpoints that do not generate."""

    def __init__(self) -> None:
        self.stopped: list[str] = []
        cancel = SimpleNamespace(interrupt=lambda: self.stopped.append("interrupt"), skip=lambda: self.stopped.append("skip"),
                                 interrupted=False)
        self.job = SimpleNamespace(id=1, user=None, cancel=cancel, finished=False)

    def current(self):
        return self.job

    def running(self) -> list:
        return [self.job]

    def pending(self) -> list:
        return []

    def interrupt_current(self) -> None:
        self.job.cancel.interrupt()

    def skip_current(self) -> None:
        self.job.cancel.skip()


@pytest.fixture
def bare_studio(tmp_path):
    registry = SimpleNamespace(refreshed=0)
    registry.refresh = lambda: setattr(registry, "refreshed", registry.refreshed + 1)
    return SimpleNamespace(config=SimpleNamespace(outputs_dir=tmp_path / "outputs"), extensions=None, jobs=RecordingJobs(),
                           registry=registry)


def with_host(server, host: str) -> dict:
    return {"Host": f"{host}:{server.port}"}


# --- Host: DNS rebinding ------------------------------------------------------------------------------

def test_a_foreign_host_name_is_refused_with_a_message_naming_the_flag(bare_studio):
    with running_server(bare_studio, api=True, ui_builder=stub_ui) as server:
        for path in ("/sdapi/v1/samplers", "/", "/config"):
            refused = requests.get(server.url + path, headers=with_host(server, "rebind.attacker.example"), timeout=TIMEOUT)
            assert refused.status_code == 400, path
            assert "rebind.attacker.example" in refused.json()["detail"] and "--allowed-hosts" in refused.json()["detail"]
        posted = requests.post(server.url + "/sdapi/v1/interrupt", headers=with_host(server, "rebind.attacker.example"), timeout=TIMEOUT)
        assert posted.status_code == 400 and bare_studio.jobs.stopped == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"])
def test_the_loopback_names_are_accepted(bare_studio, host):
    with running_server(bare_studio, api=True, ui_builder=False) as server:
        assert requests.get(server.url + "/sdapi/v1/samplers", headers=with_host(server, host), timeout=TIMEOUT).status_code == 200


def test_allowed_hosts_adds_names_the_user_lists(bare_studio):
    from ui.hosts import parse_allowed_hosts

    assert parse_allowed_hosts("studio.lan, 10.0.0.5") == ["studio.lan", "10.0.0.5"]
    with pytest.raises(ValueError, match="--allowed-hosts"):
        parse_allowed_hosts("bad host/name")
    with running_server(bare_studio, api=True, ui_builder=False, allowed_hosts=["studio.lan"]) as server:
        assert requests.get(server.url + "/sdapi/v1/samplers", headers=with_host(server, "studio.lan"), timeout=TIMEOUT).status_code == 200
        assert requests.get(server.url + "/sdapi/v1/samplers", headers=with_host(server, "other.lan"), timeout=TIMEOUT).status_code == 400


def test_listen_accepts_this_machines_own_names_and_loopback_does_not():
    from ui.hosts import HostRules

    name = socket.gethostname().lower()
    listening = HostRules.for_binding("0.0.0.0", listen=True)
    loopback = HostRules.for_binding("127.0.0.1", listen=False)
    assert listening.allows_host(f"{name}:7860") and listening.allows_host("localhost:7860")
    assert not loopback.allows_host(f"{name}.attacker.example:7860") and loopback.allows_host("127.0.0.1:7860")
    assert not listening.allows_host("attacker.example") and HostRules.for_binding("127.0.0.1", False, ["*"]).allows_host("anything")


# --- Origin: cross-site requests --------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["http://attacker.example", "null", "http://127.0.0.1:1", "https://localhost.attacker.example"])
def test_a_foreign_page_cannot_interrupt_skip_or_refresh(bare_studio, origin):
    with running_server(bare_studio, api=True, ui_builder=stub_ui) as server:
        for path in STATE_CHANGING:
            refused = requests.post(server.url + path, headers={"Origin": origin}, timeout=TIMEOUT)
            assert refused.status_code == 403, path
            assert origin in refused.json()["detail"]
        gradio = requests.post(server.url + "/gradio_api/queue/join", json={}, headers={"Origin": origin}, timeout=TIMEOUT)
        upload = requests.post(server.url + "/gradio_api/upload", files={"files": ("a.txt", b"x")}, headers={"Origin": origin},
                               timeout=TIMEOUT)
        assert gradio.status_code == 403 and upload.status_code == 403
        assert bare_studio.jobs.stopped == [] and bare_studio.registry.refreshed == 0


def test_clients_that_send_no_origin_keep_working(bare_studio):
    with running_server(bare_studio, api=True, ui_builder=False) as server:
        for path in STATE_CHANGING:
            assert requests.post(server.url + path, timeout=TIMEOUT).status_code == 200, path
    assert bare_studio.jobs.stopped == ["interrupt", "skip"] and bare_studio.registry.refreshed == 1


def test_the_servers_own_pages_keep_working(bare_studio):
    with running_server(bare_studio, api=True, ui_builder=stub_ui) as server:
        own = {"Origin": server.url}
        assert requests.post(server.url + "/sdapi/v1/interrupt", headers=own, timeout=TIMEOUT).status_code == 200
        answer = requests.post(server.url + "/gradio_api/call/shout", json={"data": ["hi"]}, headers=own, timeout=TIMEOUT)
        assert answer.status_code == 200, answer.text
        event = answer.json()["event_id"]
        stream = requests.get(f"{server.url}/gradio_api/call/shout/{event}", headers=own, timeout=TIMEOUT)
        assert "HI" in stream.text
    assert bare_studio.jobs.stopped[0] == "interrupt"


def test_same_origin_compares_scheme_host_and_port():
    from ui.hosts import same_origin

    assert same_origin("http://127.0.0.1:7860", "127.0.0.1:7860")
    assert same_origin("https://studio.lan", "studio.lan") and same_origin("http://studio.lan", "studio.lan:80")
    assert not same_origin("http://127.0.0.1:7861", "127.0.0.1:7860")
    assert not same_origin("http://localhost:7860", "127.0.0.1:7860")
    assert not same_origin("null", "127.0.0.1:7860") and not same_origin("file://", "127.0.0.1:7860")


# --- logins cover every route ---------------------------------------------------------------------------------

def test_docs_openapi_and_gradio_routes_need_the_login(bare_studio):
    with running_server(bare_studio, api=True, auth=[("artist", "pw")], ui_builder=stub_ui) as server:
        for path in ("/docs", "/openapi.json", "/gradio_api/app_id", "/gradio_api/startup-events", "/gradio_api/heartbeat/abc",
                     "/gradio_api/runs", "/gradio_api/token", "/gradio_api/info", "/config", "/manifest.json"):
            assert requests.get(server.url + path, timeout=TIMEOUT).status_code == 401, path
        for path in ("/gradio_api/reset", "/gradio_api/cancel", "/gradio_api/queue/join"):
            assert requests.post(server.url + path, json={}, timeout=TIMEOUT).status_code == 401, path
        assert requests.get(server.url + "/docs", auth=("artist", "pw"), timeout=TIMEOUT).status_code == 200
        assert requests.get(server.url + "/openapi.json", auth=("artist", "pw"), timeout=TIMEOUT).status_code == 200

        login_page = requests.get(server.url + "/", timeout=TIMEOUT)
        assert login_page.status_code == 200 and '"auth_required":true' in login_page.text.replace(" ", "")
        session = requests.Session()
        assert session.post(server.url + "/login", data={"username": "artist", "password": "pw"}, timeout=TIMEOUT).status_code == 200
        assert session.get(server.url + "/gradio_api/app_id", timeout=TIMEOUT).status_code == 200
        assert session.get(server.url + "/config", timeout=TIMEOUT).status_code == 200


def test_the_login_backs_off_after_five_wrong_passwords(bare_studio):
    with running_server(bare_studio, api=True, auth=[("artist", "pw")], ui_builder=stub_ui) as server:
        wrong = {"username": "artist", "password": "guess"}
        for _ in range(5):
            assert requests.post(server.url + "/login", data=wrong, timeout=TIMEOUT).status_code == 400
        locked = requests.post(server.url + "/login", data={"username": "artist", "password": "pw"}, timeout=TIMEOUT)
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
        assert "try again" in locked.json()["detail"]
        # The API's Basic login is the same door for the same address.
        api = requests.get(server.url + "/sdapi/v1/samplers", auth=("artist", "pw"), timeout=TIMEOUT)
        assert api.status_code == 429 and int(api.headers["Retry-After"]) >= 1


def test_basic_auth_on_the_api_backs_off_too(bare_studio):
    with running_server(bare_studio, api=True, api_auth=[("bot", "token")], ui_builder=False) as server:
        url = server.url + "/sdapi/v1/samplers"
        started = time.monotonic()
        answers = [requests.get(url, auth=("bot", f"guess{n}"), timeout=TIMEOUT).status_code for n in range(20)]
        assert answers[:5] == [401] * 5 and set(answers[5:]) == {429}
        assert time.monotonic() - started < 5  # refused at once: a lockout holds no connection open
        assert requests.get(url, auth=("bot", "token"), timeout=TIMEOUT).status_code == 429
        assert requests.get(url, timeout=TIMEOUT).status_code == 401  # no password offered: nothing to back off from


def test_the_lockout_doubles_caps_and_is_forgotten():
    from ui.login_limiter import LoginLimiter

    now = [0.0]
    limiter = LoginLimiter(clock=lambda: now[0])
    for _ in range(4):
        limiter.failed("10.0.0.9")
    assert limiter.retry_after("10.0.0.9") == 0
    waits = []
    for _ in range(12):
        limiter.failed("10.0.0.9")
        waits.append(limiter.retry_after("10.0.0.9"))
        now[0] += waits[-1]
    assert waits[:5] == [1, 2, 4, 8, 16] and max(waits) == 300
    assert limiter.retry_after("10.0.0.8") == 0  # per address
    now[0] += 15 * 60 + 1
    limiter.failed("10.0.0.9")
    assert limiter.retry_after("10.0.0.9") == 0  # a quarter of an hour without failures starts over


# --- each user sees and stops only their own jobs ----------------------------------------------------------------

class RecordingToken:
    """A job's cancel token that notes who asked to stop it, and passes the request on."""

    def __init__(self, token) -> None:
        self.token, self.calls = token, []

    def interrupt(self) -> None:
        self.calls.append("interrupt")
        self.token.interrupt()

    def skip(self) -> None:
        self.calls.append("skip")
        self.token.skip()

    @property
    def interrupted(self) -> bool:
        return self.token.interrupted


@pytest.fixture(scope="module")
def tiny_studio(tmp_path_factory):
    from dataclasses import replace

    from engine.tiny_models import build_sd1

    models = tmp_path_factory.mktemp("guard-models")
    build_sd1(models / MODEL, seed=0)
    studio = make_studio(tmp_path_factory.mktemp("guard-studio"), models)
    studio.update_settings(replace(studio.settings, preview_every=1))
    return studio


def test_a_user_sees_and_stops_only_their_own_job(tiny_studio):
    alice, bob = ("alice", "a-pw"), ("bob", "b-pw")
    with running_server(tiny_studio, api=True, auth=[alice, bob]) as server:
        outcome: dict = {}

        def alices_job():
            payload = {"prompt": "a red square", "steps": 150, "n_iter": 4, "width": 64, "height": 64, "seed": 5}
            outcome["response"] = requests.post(server.url + "/sdapi/v1/txt2img", json=payload, auth=alice, timeout=120)

        worker = threading.Thread(target=alices_job)
        worker.start()
        seen = None
        started = time.monotonic()
        while seen is None and worker.is_alive() and time.monotonic() - started < 60:
            progress = requests.get(server.url + "/sdapi/v1/progress", auth=alice, timeout=TIMEOUT).json()
            if progress["current_image"] and progress["state"]["sampling_step"] > 0:
                seen = progress
            time.sleep(0.02)
        assert seen is not None, "alice never saw her own preview"
        assert decode_b64(seen["current_image"]).size[0] > 0

        bobs_view = requests.get(server.url + "/sdapi/v1/progress", auth=bob, timeout=TIMEOUT).json()
        assert bobs_view["current_image"] is None and bobs_view["progress"] == 0
        assert "a red square" not in str(bobs_view)
        job = tiny_studio.jobs.current()
        job.cancel = spy = RecordingToken(job.cancel)
        for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            assert requests.post(server.url + path, auth=bob, timeout=TIMEOUT).status_code == 200
        assert spy.calls == [] and not spy.interrupted

        assert requests.post(server.url + "/sdapi/v1/interrupt", auth=alice, timeout=TIMEOUT).status_code == 200
        assert spy.calls == ["interrupt"]
        worker.join(60)
        assert not worker.is_alive()
        info = outcome["response"].json()["info"]
        assert '"interrupted": true' in info and len(outcome["response"].json()["images"]) < 4


def test_without_logins_every_client_sees_and_stops_the_running_job():
    from ui.session import sees_job

    anonymous, bobs = SimpleNamespace(user=None), SimpleNamespace(user="bob")
    assert sees_job(None, anonymous) and sees_job(None, bobs)
    assert sees_job("bob", bobs) and not sees_job("bob", anonymous) and not sees_job("alice", bobs)


def test_the_command_line_takes_allowed_hosts_and_names_a_bad_one(capsys):
    from ui.cli import build_parser, main

    assert "--allowed-hosts" in build_parser().format_help()
    assert main(["--allowed-hosts", "studio.lan,bad host", "--no-browser"]) == 2  # refused before any model loads
    assert "--allowed-hosts: 'bad host'" in capsys.readouterr().err
