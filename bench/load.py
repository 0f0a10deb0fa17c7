"""Load test: N concurrent clients × M jobs each against the real server's HTTP API.

    python -m bench.load --clients 4 --jobs 25            start a server child on a free port (tiny model)
    python -m bench.load --url http://127.0.0.1:7860      against a server already running

Every job asks for its own prompt and seed (unique across clients), so each
answer can be checked against the request that got it:
- lost: sent, but no image came back (HTTP error, timeout, empty answer);
- misrouted: the answer's seed or prompt is not what this client asked for;
- duplicated: an answer for a (prompt, seed) that was already answered once;
- unsent: not sent because the time bound ran out first.
The run is bounded by ``--timeout``. Exit status 0 only when nothing was lost,
misrouted or duplicated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class JobRecord:
    client: int
    job: int
    prompt: str
    seed: int  # requested
    returned_seed: int | None = None
    returned_prompt: str | None = None
    status: int | None = None  # HTTP status, None when no answer
    error: str | None = None
    seconds: float = 0.0
    image_digest: str | None = None

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.image_digest is not None

    @property
    def misrouted(self) -> bool:
        return self.answered and (self.returned_seed != self.seed or self.returned_prompt != self.prompt)


@dataclass
class LoadReport:
    url: str
    clients: int
    jobs_per_client: int
    jobs: int = 0  # sent
    answered: int = 0
    lost: int = 0
    misrouted: int = 0
    duplicated: int = 0
    unsent: int = 0
    identical_images: int = 0  # answers whose PNG equals another answer's (informational)
    wall_s: float = 0.0
    jobs_per_s: float = 0.0
    median_job_s: float | None = None
    errors: list[str] = field(default_factory=list)
    records: list[JobRecord] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.jobs > 0 and self.lost == 0 and self.misrouted == 0 and self.duplicated == 0

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("records")
        data["ok"] = self.ok
        return data


def job_prompt(client: int, job: int) -> str:
    return f"load test, client {client}, job {job}, a red circle"


def job_seed(client: int, job: int) -> int:
    return 1_000_003 * (client + 1) + 7919 * job


def _answer_fields(body: dict) -> tuple[int | None, str | None]:
    """The seed and prompt the answer carries.

    Read from the first image's own PNG infotext when it has one (the strongest
    evidence: those bytes were made for that job), else from A1111's ``info`` JSON.
    """
    images = body.get("images") or []
    if images:
        from_png = _png_fields(images[0])
        if from_png[0] is not None:
            return from_png
    info = body.get("info")
    info = json.loads(info) if isinstance(info, str) else (info or {})
    seeds = info.get("all_seeds") or [info.get("seed")]
    prompts = info.get("all_prompts") or [info.get("prompt")]
    return (int(seeds[0]) if seeds and seeds[0] is not None else None), (prompts[0] if prompts else None)


def _png_fields(image_b64: str) -> tuple[int | None, str | None]:
    import base64
    import io

    from PIL import Image

    from engine.infotext import parse_infotext

    try:
        image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
        text = image.info.get("parameters")
        if not text:
            return None, None
        fields = parse_infotext(text)
        return int(fields["Seed"]), fields.get("Prompt")
    except Exception:  # noqa: BLE001 - an unreadable image leaves the info JSON to decide
        return None, None


def _client(url: str, client: int, jobs: int, steps: int, size: int, deadline: float, records: list[JobRecord], lock: threading.Lock) -> None:
    import requests

    session = requests.Session()
    for job in range(jobs):
        remaining = deadline - time.monotonic()
        record = JobRecord(client, job, job_prompt(client, job), job_seed(client, job))
        if remaining <= 0:
            record.error = "unsent"
            with lock:
                records.append(record)
            continue
        payload = {"prompt": record.prompt, "negative_prompt": "", "seed": record.seed, "steps": steps, "width": size,
                   "height": size, "cfg_scale": 7.0, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1,
                   "send_images": True, "save_images": False}
        start = time.monotonic()
        try:
            answer = session.post(f"{url}/sdapi/v1/txt2img", json=payload, timeout=remaining)
            record.status = answer.status_code
            if answer.status_code == 200:
                body = answer.json()
                record.returned_seed, record.returned_prompt = _answer_fields(body)
                images = body.get("images") or []
                if images:
                    record.image_digest = hashlib.sha256(images[0].encode()).hexdigest()[:16]
            else:
                record.error = f"HTTP {answer.status_code}: {answer.text[:200]}"
        except Exception as error:  # noqa: BLE001 - every failure is a lost job, recorded
            record.error = f"{type(error).__name__}: {error}"
        record.seconds = time.monotonic() - start
        with lock:
            records.append(record)


def run_load(url: str, clients: int, jobs: int, steps: int = 2, size: int = 64, timeout_s: float = 300.0) -> LoadReport:
    """Run the clients against ``url`` and check every answer."""
    records: list[JobRecord] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + timeout_s
    threads = [threading.Thread(target=_client, args=(url, c, jobs, steps, size, deadline, records, lock), daemon=True)
               for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 30)
    report = LoadReport(url, clients, jobs, wall_s=round(time.monotonic() - start, 3))
    with lock:
        report.records = sorted(records, key=lambda r: (r.client, r.job))
    sent = [r for r in report.records if r.error != "unsent"]
    report.unsent = clients * jobs - len(sent)
    report.jobs = len(sent)
    answered = [r for r in sent if r.answered]
    report.answered = len(answered)
    report.lost = len(sent) - len(answered)
    report.misrouted = sum(r.misrouted for r in answered)
    seen = Counter((r.returned_prompt, r.returned_seed) for r in answered)
    report.duplicated = sum(count - 1 for count in seen.values() if count > 1)
    digests = Counter(r.image_digest for r in answered)
    report.identical_images = sum(count - 1 for count in digests.values() if count > 1)
    report.jobs_per_s = round(report.answered / report.wall_s, 3) if report.wall_s else 0.0
    durations = sorted(r.seconds for r in answered)
    report.median_job_s = round(durations[len(durations) // 2], 3) if durations else None
    report.errors = sorted({r.error for r in sent if r.error})[:10]
    return report


def format_report(report: LoadReport) -> str:
    rows = [("clients", report.clients), ("jobs sent", report.jobs), ("answered", report.answered), ("lost", report.lost),
            ("misrouted", report.misrouted), ("duplicated", report.duplicated), ("unsent (time bound)", report.unsent),
            ("identical images", report.identical_images), ("wall time", f"{report.wall_s:.1f} s"),
            ("throughput", f"{report.jobs_per_s:.2f} jobs/s"), ("median job", f"{report.median_job_s} s"),
            ("verdict", "ok" if report.ok else "PROBLEMS")]
    lines = [f"{name:<22}{value}" for name, value in rows]
    lines += [f"error: {error}" for error in report.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=25, help="jobs per client")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run, seconds")
    parser.add_argument("--url", default=None, help="a running server (default: start one on a free port)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the started server")
    parser.add_argument("--out", type=Path, default=None, help="write the report (with every job) as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.url:
        report = run_load(args.url.rstrip("/"), args.clients, args.jobs, args.steps, args.size, args.timeout)
    else:
        from .server import running_server, unavailable_reason

        reason = unavailable_reason("api")
        if reason:
            print(f"skipped: {reason}")
            return 0
        from .fixtures import TINY_SD1, build_tiny_models, quiet_libraries

        quiet_libraries()

        with tempfile.TemporaryDirectory(prefix="sfumato-load-") as folder:
            models = build_tiny_models(Path(folder) / "models")
            print(f"starting a server ({TINY_SD1}, API only) ...", flush=True)
            with running_server(models, None, TINY_SD1, ui=False, threads=args.threads, preview_every=1) as url:
                print(f"{args.clients} clients × {args.jobs} jobs against {url}", flush=True)
                report = run_load(url, args.clients, args.jobs, args.steps, args.size, args.timeout)
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**report.summary(), "records": [asdict(r) for r in report.records]}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
