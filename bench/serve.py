"""Bench: serve mode (engine replicas on Ray Serve) against one process, on the demo model.

Two figures:

- throughput: the same batch of jobs through the studio's queue with 2 CPU replicas, and with 1, one torch
  thread each on a local Ray; ``2 replicas ÷ 1`` in jobs per second (ideal 2×, aim ≥ 1.6× on 2 cores);
- overhead: one job at a time through Ray (queue → handle → replica → streamed result) ÷ the same job run by
  an engine in this process with one thread; the difference is Ray's and the queue's cost per job.

Each deployment is a fresh local Ray (num_cpus = the replicas it holds), started, warmed (each replica
loads the model once) and shut down inside the bench; nothing is saved (``save=False``). Smoke mode skips:
starting Ray takes tens of seconds. The GPU case (a replica per GPU) is not measured here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .fixtures import BUILTIN_DIR, BenchContext, request
from .report import BenchResult, Row
from .timing import clock, median, ms

JOBS = {"quick": 12, "full": 24}
OVERHEAD_REPETITIONS = {"quick": 5, "full": 11}
THROUGHPUT_GOAL = 1.6  # 2 replicas ÷ 1, on 2 cores with one thread each


def _studio(folder: Path):
    from engine.studio import Studio, StudioConfig

    config = StudioConfig(models_dir=folder / "models", outputs_dir=folder / "outputs", user_dir=folder / "user",
                          builtin_models_dir=BUILTIN_DIR, device="cpu", dtype="float32")
    return Studio(config)


def _deployment(replicas: int, ctx: BenchContext, requests: list, local_run=None) -> dict:
    """Start ``replicas`` replicas, warm each, run ``requests`` all queued at once; with ``local_run`` also time
    the first request alone through Ray, alternating with ``local_run`` (the same job in this process) so both
    see the same load. Ray is shut down before returning."""
    from engine.replicas import ScaleOut, start_replicas, stop_replicas

    with tempfile.TemporaryDirectory(prefix="sfumato-bench-serve-") as folder:
        studio = _studio(Path(folder))
        tick = clock()
        running = start_replicas(studio, ScaleOut(replicas=replicas, num_cpus=replicas, threads=1))
        started_s = clock() - tick
        try:
            for job in [studio.jobs.submit(requests[0], save=False) for _ in range(replicas)]:
                job.wait(600)  # each replica loads the model once
            tick = clock()
            jobs = [studio.jobs.submit(req, save=False) for req in requests]
            for job in jobs:
                job.wait(600)
            batch_s = clock() - tick
            figures = {"replicas": replicas, "jobs": len(jobs), "batch_s": round(batch_s, 3),
                       "jobs_per_s": round(len(jobs) / batch_s, 3), "start_s": round(started_s, 1),
                       "replicas_used": len({job.ran_on for job in jobs})}
            if local_run is not None:
                alone, local = [], []
                for _ in range(OVERHEAD_REPETITIONS.get(ctx.mode.name, 5)):
                    local.append(local_run())
                    tick = clock()
                    studio.jobs.submit(requests[0], save=False).wait(600)
                    alone.append(clock() - tick)
                figures["one_job_ms"], figures["local_one_job_ms"] = ms(median(alone)), ms(median(local))
            return figures
        finally:
            stop_replicas(running)


def run(ctx: BenchContext) -> BenchResult:
    title = "Serve mode: engine replicas on Ray Serve"
    if ctx.mode.name == "smoke":
        return BenchResult("serve", title, skipped="smoke mode: starting Ray takes tens of seconds (tests/test_ray_serve.py covers it)")
    if ctx.models.sd1 != "sfumato-demo":
        return BenchResult("serve", title, skipped="needs the built-in demo model")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return BenchResult("serve", title, skipped="ray[serve] is not installed")
    mode = ctx.mode
    count = JOBS.get(mode.name, 12)
    requests = [request(ctx.models.sd1, mode, seed=1000 + index) for index in range(count)]
    one = requests[0]

    def local_run() -> float:
        tick = clock()
        ctx.engine.generate(one)
        return clock() - tick

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the single-process reference gets what one replica gets
    try:
        local_run()  # warm
        ctx.log(f"  1 replica: {count} jobs, then one job alone, alternating with the same job in this process")
        single = _deployment(1, ctx, requests, local_run=local_run)
    finally:
        torch.set_num_threads(threads)
    local_ms = single["local_one_job_ms"]
    ctx.log(f"  2 replicas: {count} jobs")
    double = _deployment(2, ctx, requests)
    throughput = double["jobs_per_s"] / single["jobs_per_s"]
    overhead = single["one_job_ms"] / local_ms
    figures = {"one_replica": single, "two_replicas": double, "throughput_ratio": round(throughput, 3),
               "local_one_job_ms": local_ms, "ray_one_job_ms": single["one_job_ms"], "overhead_ratio": round(overhead, 3),
               "steps": mode.steps, "size": mode.size}
    rows = [
        Row("serve: time for the jobs, 2 replicas ÷ 1", round(1 / throughput, 3), goal=round(1 / THROUGHPUT_GOAL, 3),
            note=f"{count} jobs, demo model {mode.size}², {mode.steps} steps; throughput {throughput:.2f}× (aim ≥ {THROUGHPUT_GOAL}×)"),
        Row("serve: one job through Ray ÷ in process", round(overhead, 3),
            note=f"{single['one_job_ms']:.0f} ms vs {local_ms:.0f} ms, one thread each"),
    ]
    return BenchResult("serve", title, figures, rows)
