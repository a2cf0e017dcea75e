"""Choosing a tf.distribute strategy for whatever the machine has."""
from __future__ import annotations

import json
import os

import tensorflow as tf

CHOICES = ("auto", "default", "mirrored", "multi_worker")


def _tf_config_workers() -> int:
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except ValueError:
        raise ValueError("TF_CONFIG is set but is not JSON") from None
    return sum(len(cluster.get(k, [])) for k in ("chief", "worker"))


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """auto: MultiWorkerMirrored when TF_CONFIG names several workers (Vertex AI
    sets it), Mirrored when there are several GPUs, else the default strategy."""
    if name not in CHOICES:
        raise ValueError(f"--strategy {name}: choose one of {', '.join(CHOICES)}")
    if name == "auto":
        if _tf_config_workers() > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        # No GPU: mirror over the logical CPU devices (tests split the CPU in two).
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the job's outputs (summaries, final files, export)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def workers(strategy: tf.distribute.Strategy) -> int:
    """How many machines train this job (1 but for MultiWorkerMirrored)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(spec.get(k, [])) for k in ("chief", "worker")))
