"""Serve mode: the studio's one job queue over many engine replicas, on Ray Serve.

    front process (the studio: UI, /sdapi/v1, the JobQueue, the one output writer)
        └── ReplicaRunner ── DeploymentHandle ──▶ EngineReplica × N (one device each, Ray Serve replicas)
                  └── JobSignals (a Ray actor): interrupt and skip, to whichever replica runs the job

Ray Serve schedules, routes (``multiplexed_model_id``: a job goes first to a replica already holding its
model), streams progress back, autoscales and replaces dead replicas; this package only says what a
replica does with a job (``deployment``), how the queue hands one over and reruns it if its replica dies
(``runner``), and how the cluster is started or joined (``cluster``). Ray is imported only here.
"""
from __future__ import annotations

from .cluster import ScaleOut, start_replicas, stop_replicas
from .runner import ReplicaRunner

__all__ = ["ReplicaRunner", "ScaleOut", "start_replicas", "stop_replicas"]
