"""Serve mode: the studio's one queue and API over two engine replicas on Ray Serve (issue 21).

One local Ray on 127.0.0.1 (2 CPUs, no dashboard) and one deployment of two CPU replicas serve the whole
module; the demo model draws 64x64 pictures in a few steps with one torch thread per replica. The
reference for pixels is the same request run by a plain in-process engine, here in the test process.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("ray.serve")
torch.set_num_threads(1)

from engine.request import GenerationRequest  # noqa: E402
from tests._api_fixtures import decode_b64, running_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
DEMO = "sfumato-demo"
USERS = [("alice", "pw-a"), ("bob", "pw-b")]
TIMEOUT = 120


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """A studio whose jobs run on two replicas, and its API server with logins; Ray stopped afterwards."""
    from engine.replicas import ScaleOut, start_replicas, stop_replicas
    from engine.studio import Studio, StudioConfig

    tmp = tmp_path_factory.mktemp("serve")
    config = StudioConfig(models_dir=tmp / "models", outputs_dir=tmp / "outputs", user_dir=tmp / "user",
                          extensions_dir=REPO / "extensions", presets_dir=REPO / "presets", builtin_models_dir=REPO / "builtin",
                          device="cpu", dtype="float32")
    studio = Studio(config)
    studio.update_settings(replace(studio.settings, default_model=DEMO))
    replicas = start_replicas(studio, ScaleOut(replicas=2, num_cpus=2, threads=1))
    try:
        with running_server(studio, api=True, auth=USERS, ui_builder=False) as server:
            yield studio, replicas, server
    finally:
        stop_replicas(replicas)


def demo_request(seed: int, steps: int = 3, **changes) -> GenerationRequest:
    return GenerationRequest(prompt=f"a red fox, number {seed}", model=DEMO, steps=steps, width=64, height=64, seed=seed,
                             sampler="Euler", **changes)


def saved_seeds(studio) -> Counter:
    """How many times each seed was saved (the file names end in the seed, A1111's default pattern)."""
    names = [path.name for path in Path(studio.config.outputs_dir).rglob("*.png")]
    return Counter(int(re.fullmatch(r"\d+-(\d+)\.png", name).group(1)) for name in names)


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# -- flags and options (no Ray needed) -------------------------------------------------------------------------

def test_the_serve_flags_map_onto_ray_serve_options():
    from engine.replicas.cluster import ScaleOut, deployment_options
    from ui.cli import build_parser, scale_out

    args, _ = build_parser().parse_known_args(["--api", "serve", "--replicas", "2", "--auth", "a:b", "--port", "7999"])
    assert (args.api, args.auth, args.port) == (True, "a:b", 7999)  # the usual flags, before or after `serve`
    assert scale_out(args) == ScaleOut(replicas=2)
    assert scale_out(build_parser().parse_known_args(["serve"])[0]) is None  # no scale flag: jobs run in this process

    on_gpus = deployment_options(ScaleOut(replicas="auto"), gpus=4, cpus=32)
    assert on_gpus["num_replicas"] == 4 and on_gpus["ray_actor_options"] == {"num_gpus": 1}
    on_cpus = deployment_options(ScaleOut(replicas=3, threads=2), gpus=0, cpus=8)
    assert on_cpus["num_replicas"] == 3 and on_cpus["ray_actor_options"] == {"num_cpus": 2}
    assert on_cpus["max_ongoing_requests"] == 1  # a replica runs one job at a time; the queue waits for a free one
    scaling = deployment_options(ScaleOut(min_replicas=1, max_replicas=6), gpus=8, cpus=64)
    assert "num_replicas" not in scaling
    assert {key: scaling["autoscaling_config"][key] for key in ("min_replicas", "max_replicas")} == {"min_replicas": 1, "max_replicas": 6}
    with pytest.raises(ValueError):
        deployment_options(ScaleOut(min_replicas=4, max_replicas=2), gpus=0, cpus=8)


# -- load -------------------------------------------------------------------------------------------------------

def test_forty_jobs_from_four_clients_are_all_answered_once_and_to_the_right_client(serving):
    studio, replicas, server = serving
    answers: dict[int, dict] = {}
    failures: list[str] = []

    def client(number: int) -> None:
        user = USERS[number % 2]
        for job in range(10):
            seed = 5000 + number * 100 + job
            body = {"prompt": f"client {number} job {job}", "seed": seed, "steps": 2, "width": 64, "height": 64,
                    "sampler_name": "Euler", "cfg_scale": 3, "save_images": True}
            try:
                answer = requests.post(server.url + "/sdapi/v1/txt2img", json=body, auth=user, timeout=TIMEOUT)
                answers[seed] = {"sent": body, "status": answer.status_code, "json": answer.json()}
            except Exception as error:  # noqa: BLE001 - counted as lost below
                failures.append(f"{seed}: {error}")

    started = time.monotonic()
    clients = [threading.Thread(target=client, args=(number,)) for number in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(TIMEOUT)
    elapsed = time.monotonic() - started

    sent = {5000 + number * 100 + job for number in range(4) for job in range(10)}
    lost = sorted(seed for seed in sent if seed not in answers or answers[seed]["status"] != 200)
    misrouted = []
    for seed, answer in answers.items():
        if answer["status"] != 200:
            continue
        info = json.loads(answer["json"]["info"])
        infotext = info["infotexts"][0]
        image_text = decode_b64(answer["json"]["images"][0]).info.get("parameters", "")
        if (info["seed"] != seed or f"Seed: {seed}," not in infotext or not infotext.startswith(answer["sent"]["prompt"] + "\n")
                or image_text != infotext):
            misrouted.append(seed)
    saved = saved_seeds(studio)
    duplicated = sorted(seed for seed, count in saved.items() if count > 1)
    print(f"\nserve load: {len(sent)} jobs, 4 clients, {elapsed:.1f} s; lost {len(lost)}, misrouted {len(misrouted)}, "
          f"duplicated {len(duplicated)}")
    assert failures == [] and lost == [], (failures, lost)
    assert misrouted == []
    assert duplicated == [] and set(saved) >= sent  # each saved exactly once, by the front process's one writer


def test_an_xyz_plot_runs_its_cells_on_the_replicas(serving):
    _, _, server = serving
    script_args = [4, "2,3", [], 9, "", ["Euler", "DPM++ 2M"], 0, "", [], True, True]  # X = Steps, Y = Sampler
    body = {"prompt": "a plotted fox", "steps": 3, "width": 64, "height": 64, "seed": 33,
            "script_name": "X/Y/Z plot", "script_args": script_args}
    answer = requests.post(server.url + "/sdapi/v1/txt2img", json=body, auth=USERS[0], timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    infotexts = json.loads(answer.json()["info"])["infotexts"]
    cells = [dict(re.findall(r"(Steps|Sampler): ([^,]+)", text)) for text in infotexts[1:]]
    assert cells == [{"Steps": "2", "Sampler": "Euler"}, {"Steps": "3", "Sampler": "Euler"},
                     {"Steps": "2", "Sampler": "DPM++ 2M"}, {"Steps": "3", "Sampler": "DPM++ 2M"}]
    assert all("Seed: 33," in text for text in infotexts[1:])


# -- previews and interrupts ----------------------------------------------------------------------------------------

def test_previews_arrive_from_the_replica_during_a_job(serving):
    studio, _, _ = serving
    job = studio.jobs.submit(demo_request(61, steps=6, preview_every=1), save=False)
    events = list(job.events(timeout=TIMEOUT))
    assert events[-1].kind == "result", events[-1].error
    previews = [event.progress for event in events[:-1] if event.progress.has_preview]
    assert previews, "no preview reached the front before the result"
    assert all(isinstance(progress.preview, Image.Image) for progress in previews)  # drawn on the replica, sent as pixels
    steps = [event.progress.step for event in events[:-1]]
    assert steps == sorted(steps) and steps[-1] == 6
    assert job.ran_on is not None


def test_an_interrupt_reaches_the_replica_running_that_job_and_no_other(serving):
    studio, _, _ = serving
    long_job = studio.jobs.submit(demo_request(71, steps=150, batch_count=4), save=False)
    short_job = studio.jobs.submit(demo_request(72, steps=40), save=False)
    wait_until(lambda: long_job.progress is not None and short_job.progress is not None)
    assert long_job.ran_on != short_job.ran_on  # one on each replica
    assert not short_job.finished
    studio.jobs.cancel(long_job)
    stopped = long_job.wait(TIMEOUT)
    finished = short_job.wait(TIMEOUT)
    assert stopped.interrupted and stopped.images[-1].stopped_early.step < 150
    assert not finished.interrupted and finished.images[0].stopped_early is None
    assert not long_job.cancel.interrupt_pending  # the replica honoured it; nothing is left pending in the front


def test_a_skip_reaches_the_replica_and_ends_one_image_only(serving):
    studio, _, _ = serving
    job = studio.jobs.submit(demo_request(75, steps=50, batch_count=2), save=False)
    wait_until(lambda: job.progress is not None)
    job.cancel.skip()
    result = job.wait(TIMEOUT)
    stops = [image.stopped_early.reason if image.stopped_early else None for image in result.images]
    assert not result.interrupted and len(stops) == 2 and stops.count("skipped") == 1 and stops.count(None) == 1


# -- logins, Host and Origin ----------------------------------------------------------------------------------------

def test_logins_host_and_origin_rules_hold_in_serve_mode(serving):
    studio, _, server = serving
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    assert requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=TIMEOUT).status_code == 401
    assert requests.get(server.url + "/sdapi/v1/progress", timeout=TIMEOUT).status_code == 401
    foreign_host = {"Host": f"evil.example:{server.port}"}
    assert requests.get(server.url + "/sdapi/v1/progress", headers=foreign_host, auth=USERS[0], timeout=TIMEOUT).status_code == 400
    foreign_origin = {"Origin": "http://evil.example"}
    assert requests.post(server.url + "/sdapi/v1/interrupt", headers=foreign_origin, auth=USERS[0], timeout=TIMEOUT).status_code == 403

    # Alice's job runs on a replica; Bob sees and stops only his own, Alice stops hers.
    alice_body = {"prompt": "alice's", "seed": 81, "steps": 150, "n_iter": 4, "width": 64, "height": 64,
                  "sampler_name": "Euler"}
    reply: dict = {}
    thread = threading.Thread(target=lambda: reply.update(answer=requests.post(
        server.url + "/sdapi/v1/txt2img", json=alice_body, auth=USERS[0], timeout=TIMEOUT)))
    thread.start()
    wait_until(lambda: any(job.user == "alice" and job.progress is not None for job in studio.jobs.running()))
    alice_job = next(job for job in studio.jobs.running() if job.user == "alice")
    assert requests.post(server.url + "/sdapi/v1/interrupt", auth=USERS[1], timeout=TIMEOUT).status_code == 200
    bob_view = requests.get(server.url + "/sdapi/v1/progress", auth=USERS[1], timeout=TIMEOUT).json()
    assert bob_view["current_image"] is None and "another user's job" in (bob_view["textinfo"] or "")
    time.sleep(0.3)
    assert not alice_job.cancel.interrupted and not alice_job.finished
    alice_view = requests.get(server.url + "/sdapi/v1/progress", auth=USERS[0], timeout=TIMEOUT).json()
    assert alice_view["state"]["job"] == f"txt2img job {alice_job.id}"
    assert requests.post(server.url + "/sdapi/v1/interrupt", auth=USERS[0], timeout=TIMEOUT).status_code == 200
    thread.join(TIMEOUT)
    info = json.loads(reply["answer"].json()["info"])
    assert "Interrupted at step" in info["infotexts"][0]


# -- a replica dies mid-job -------------------------------------------------------------------------------------------

def test_a_job_whose_replica_is_killed_reruns_on_the_other_with_the_same_pixels_saved_once(serving):
    import ray

    from engine.engine import Engine
    from engine.models import ModelRegistry

    studio, replicas, _ = serving
    request = demo_request(91, steps=60)
    reruns_before = replicas.runner.reruns
    job = studio.jobs.submit(request, save=True)
    wait_until(lambda: job.progress is not None and job.progress.step >= 2)
    doomed = job.ran_on
    ray.kill(ray.get_actor(replicas.runner.actors[doomed], namespace="serve"), no_restart=True)
    result = job.wait(TIMEOUT)

    assert replicas.runner.reruns == reruns_before + 1
    assert job.ran_on not in (None, doomed)
    assert not result.interrupted and result.images[0].seed == 91
    assert saved_seeds(studio)[91] == 1
    single = Engine(ModelRegistry(None, REPO / "builtin", device="cpu", dtype="float32")).generate(request)
    assert np.array_equal(np.asarray(result.images[0].image), np.asarray(single.images[0].image))
    assert result.images[0].infotext == single.images[0].infotext
