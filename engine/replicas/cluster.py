"""Start (or join) Ray, deploy the engine replicas on Ray Serve, and hand back the queue's runner.

``--replicas N`` asks for N replicas; ``auto`` for one per GPU in the cluster (one per CPU slot of
``threads`` cores where there is none); ``--min-replicas``/``--max-replicas`` become Serve's
``autoscaling_config`` (it adds replicas while jobs wait and removes idle ones). Each replica takes one
GPU (``num_gpus: 1``) where the cluster has GPUs, else ``threads`` CPUs. Serve runs no HTTP proxy of its
own: the studio's one server (with its login, Host and Origin rules) stays the only way in.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..models import REPO_ROOT
from .runner import ReplicaRunner

log = logging.getLogger("sfumato.replicas")

APP_NAME = "sfumato"
DEPLOYMENT_NAME = "EngineReplica"
AUTO = "auto"


@dataclass
class ScaleOut:
    """How many replicas, where, and on what."""

    replicas: int | str = 1  # a count, or AUTO
    min_replicas: int | None = None  # either bound given: Serve autoscales between them
    max_replicas: int | None = None
    ray_address: str | None = None  # None: start a local Ray on 127.0.0.1
    threads: int = 1  # torch threads (and CPUs reserved) per CPU replica
    num_cpus: int | None = None  # the local Ray's CPUs (None: Ray counts them)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


@dataclass
class Replicas:
    """A running deployment: the runner the studio's queue uses, and what ``stop_replicas`` undoes."""

    runner: ReplicaRunner
    handle: object
    signals: object
    started_ray: bool
    count: int  # replicas asked for (the autoscaling maximum when autoscaling)


def _worker_environment(threads: int) -> dict:
    """The replicas' environment: this checkout importable, one OpenMP team of ``threads``, no hub access."""
    path = os.pathsep.join(part for part in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if part)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _connect(scale: ScaleOut) -> bool:
    """Join ``scale.ray_address`` or start a local Ray bound to 127.0.0.1; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": _worker_environment(scale.threads)}
    if scale.ray_address:
        ray.init(address=scale.ray_address, runtime_env=runtime_env, namespace=APP_NAME, log_to_driver=False)
        return True
    ray.init(num_cpus=scale.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=runtime_env,
             namespace=APP_NAME, log_to_driver=False, configure_logging=False)
    return True


def replica_count(scale: ScaleOut, gpus: int, cpus: int) -> int:
    """``--replicas``: the number given, or for ``auto`` one per GPU (one per ``threads`` CPUs without GPUs)."""
    if scale.replicas != AUTO:
        count = int(scale.replicas)
        if count < 1:
            raise ValueError(f"--replicas must be at least 1 or 'auto', got {scale.replicas}")
        return count
    return gpus if gpus > 0 else max(1, cpus // max(1, scale.threads))


def deployment_options(scale: ScaleOut, gpus: int, cpus: int) -> dict:
    """Ray Serve's options for the engine deployment: replicas or autoscaling bounds, and each one's device."""
    count = replica_count(scale, gpus, cpus)
    actor = {"num_gpus": 1} if gpus > 0 else {"num_cpus": scale.threads}
    options: dict = {"name": DEPLOYMENT_NAME, "ray_actor_options": actor, "max_ongoing_requests": 1,
                     "graceful_shutdown_timeout_s": 5}
    if scale.autoscaling:
        low = scale.min_replicas if scale.min_replicas is not None else 1
        high = scale.max_replicas if scale.max_replicas is not None else max(low, count)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"--min-replicas {low} and --max-replicas {high}: need 0 <= min <= max and max >= 1")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(low, 1), high),
                                         "target_ongoing_requests": 1}
    else:
        options["num_replicas"] = count
    return options


def start_replicas(studio, scale: ScaleOut) -> Replicas:
    """Deploy the engine replicas for ``studio`` and switch its queue to them; returns once they are up."""
    import ray
    from ray import serve

    from .deployment import EngineReplica
    from .signals import JobSignals

    started = _connect(scale)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    options = deployment_options(scale, gpus, cpus)
    serve.start(proxy_location="Disabled")
    signals = ray.remote(num_cpus=0)(JobSignals).remote()
    app = serve.deployment(EngineReplica).options(**options).bind(studio.config, studio.settings, signals, scale.threads)
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    count = options.get("num_replicas") or options["autoscaling_config"]["max_replicas"]
    runner = ReplicaRunner(handle, signals, slots=count, default_model=studio.default_model)
    studio.run_jobs_on(runner)
    log.info("serving with %s engine replica(s) on Ray Serve", count)
    return Replicas(runner, handle, signals, started, count)


def stop_replicas(replicas: Replicas) -> None:
    """Delete the deployment; stop Serve and Ray too when ``start_replicas`` started them."""
    import ray
    from ray import serve

    if replicas.started_ray:  # ours alone: stopping Serve deletes the application with it
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)
