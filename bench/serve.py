"""Bench: serve mode (engine replicas on Ray Serve) against one process, on the demo model.

Two figures, on one deployment of 2 CPU replicas (one torch thread each) on a local Ray:

- throughput: the same batch of jobs through the studio's queue with both replicas working (2 jobs in flight)
  and with one (1 job in flight: the other replica idles, costing nothing); ``2 replicas ÷ 1`` in jobs per
  second (ideal 2×, aim ≥ 1.6× on 2 cores). The two are alternated over a few rounds and their medians
  compared, so a change in the machine's load during the bench touches both alike;
- overhead: one job alone through Ray (queue → handle → replica → streamed result) ÷ the same job run by an
  engine in this process with one thread, alternated likewise; the difference is Ray's and the queue's cost.

Ray is started, warmed (each replica loads the model once) and shut down inside the bench; nothing is
saved. Smoke mode skips: starting Ray takes tens of seconds. GPUs are not measured here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .fixtures import BUILTIN_DIR, BenchContext, request
from .report import BenchResult, Row
from .timing import clock, median, ms

JOBS = {"quick": 12, "full": 24}
ROUNDS = {"quick": 3, "full": 5}
OVERHEAD_REPETITIONS = {"quick": 5, "full": 11}
THROUGHPUT_GOAL = 1.6  # 2 replicas ÷ 1, on 2 cores with one thread each
REPLICAS = 2


def _studio(folder: Path):
    from engine.studio import Studio, StudioConfig

    config = StudioConfig(models_dir=folder / "models", outputs_dir=folder / "outputs", user_dir=folder / "user",
                          builtin_models_dir=BUILTIN_DIR, device="cpu", dtype="float32")
    return Studio(config)


def _batch_s(queue, requests: list) -> float:
    tick = clock()
    for job in [queue.submit(req, save=False) for req in requests]:
        job.wait(600)
    return clock() - tick


def _measure(ctx: BenchContext, requests: list, local_run) -> dict:
    from engine.jobs import JobQueue
    from engine.replicas import ReplicaRunner, ScaleOut, start_replicas, stop_replicas

    mode = ctx.mode.name
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-serve-") as folder:
        studio = _studio(Path(folder))
        tick = clock()
        running = start_replicas(studio, ScaleOut(replicas=REPLICAS, num_cpus=REPLICAS, threads=1))
        started_s = clock() - tick
        try:
            runner = running.runner
            queues = {slots: JobQueue(studio.engine, runner=ReplicaRunner(running.handle, running.signals, slots, studio.default_model))
                      for slots in (1, REPLICAS)}
            _batch_s(queues[REPLICAS], requests[:REPLICAS])  # each replica loads the model once
            batches: dict[int, list[float]] = {1: [], REPLICAS: []}
            for _ in range(ROUNDS.get(mode, 3)):
                for slots, queue in queues.items():
                    batches[slots].append(_batch_s(queue, requests))
            alone, local = [], []
            for _ in range(OVERHEAD_REPETITIONS.get(mode, 5)):
                local.append(local_run())
                alone.append(_batch_s(queues[1], requests[:1]))
            return {"start_s": round(started_s, 1), "jobs": len(requests), "reruns": runner.reruns,
                    "batch_s": {f"{slots}_replica{'s' if slots > 1 else ''}": [round(value, 3) for value in values]
                                for slots, values in batches.items()},
                    "one_replica_jobs_per_s": round(len(requests) / median(batches[1]), 3),
                    "two_replicas_jobs_per_s": round(len(requests) / median(batches[REPLICAS]), 3),
                    "ray_one_job_ms": ms(median(alone)), "local_one_job_ms": ms(median(local))}
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

    def local_run() -> float:
        tick = clock()
        ctx.engine.generate(requests[0])
        return clock() - tick

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the single-process reference gets what one replica gets
    try:
        local_run()  # warm
        ctx.log(f"  {REPLICAS} replicas: {count} jobs with 1 and with {REPLICAS} in flight, alternated; then one job alone vs in process")
        figures = _measure(ctx, requests, local_run)
    finally:
        torch.set_num_threads(threads)
    throughput = figures["two_replicas_jobs_per_s"] / figures["one_replica_jobs_per_s"]
    overhead = figures["ray_one_job_ms"] / figures["local_one_job_ms"]
    figures.update(throughput_ratio=round(throughput, 3), overhead_ratio=round(overhead, 3), steps=mode.steps, size=mode.size)
    rows = [
        Row("serve: time for the jobs, 2 replicas ÷ 1", round(1 / throughput, 3), goal=round(1 / THROUGHPUT_GOAL, 3),
            note=f"{count} jobs, demo model {mode.size}², {mode.steps} steps; throughput {throughput:.2f}× (aim ≥ {THROUGHPUT_GOAL}×)"),
        Row("serve: one job through Ray ÷ in process", round(overhead, 3),
            note=f"{figures['ray_one_job_ms']:.0f} ms vs {figures['local_one_job_ms']:.0f} ms, one thread each"),
    ]
    return BenchResult("serve", title, figures, rows)
