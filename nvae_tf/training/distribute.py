"""Where training runs: the ``tf.distribute`` strategy, this process's role, the precision policy.

Strategies (``nvae-train --strategy``):
  ``one_device``    the first GPU, else the CPU.
  ``mirrored``      all local GPUs, synchronous data parallelism in one process (the original's
                    one-process-per-GPU setup, docs/design.md#distributed-training).
  ``multi_worker``  ``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG`` (or built
                    by ``set_cluster`` from ``--workers``/``--task-index``); every worker runs
                    the same command and uses all its local GPUs.
  ``auto``          ``multi_worker`` when ``TF_CONFIG`` names more than one task, else
                    ``mirrored`` with several GPUs, else ``one_device``.
The per-replica batch is ``config.batch_size`` under every strategy, as in the paper.
"""

import contextlib
import json
import os

import keras
import tensorflow as tf

from nvae_tf import graph_optimization
from nvae_tf.config import ConfigError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def set_cluster(workers, task_index):
    """Set ``TF_CONFIG`` for a cluster of ``workers`` ("host:port" list); we are ``task_index``."""
    if not 0 <= task_index < len(workers):
        raise ConfigError(
            f"--task-index must be in [0, {len(workers)}) for {len(workers)} "
            f"worker(s), got {task_index}"
        )
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": task_index}}
    )


def cluster_size():
    """Tasks listed in ``TF_CONFIG`` (0 when it is unset)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError):
        raise ConfigError("TF_CONFIG is not a JSON object with a 'cluster' entry") from None
    return sum(len(tasks) for tasks in cluster.values())


def make_strategy(name="auto"):
    """The strategy called ``name`` (see the module docstring). Create it before other TF work."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    # Physical devices: listing logical ones would start the runtime, after which
    # MultiWorkerMirroredStrategy can no longer configure its collectives.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        name = (
            "multi_worker" if cluster_size() > 1 else "mirrored" if len(gpus) > 1 else "one_device"
        )
    if name == "multi_worker":
        if cluster_size() < 1:
            raise ConfigError(
                "strategy multi_worker needs a cluster: set TF_CONFIG or pass "
                "--workers and --task-index"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def is_multi_worker(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and bool(resolver.cluster_spec().as_dict())


def worker_id(strategy):
    """This worker's index among all workers (the chief is 0), 0 without a cluster."""
    if not is_multi_worker(strategy):
        return 0
    resolver = strategy.cluster_resolver
    if resolver.task_type == "chief":
        return 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_id + (1 if has_chief else 0)


def is_chief(strategy):
    """Whether this process writes the run directory (one process per cluster does)."""
    return worker_id(strategy) == 0


def local_replicas(strategy):
    """Replicas driven by this process (its devices)."""
    return len(strategy.extended.worker_devices)


def num_workers(strategy):
    return strategy.num_replicas_in_sync // local_replicas(strategy)


def input_context(strategy):
    """This worker's ``InputContext``: its shard of the data, batched for all its replicas."""
    workers = num_workers(strategy)
    return tf.distribute.InputContext(
        num_input_pipelines=workers,
        input_pipeline_id=worker_id(strategy),
        num_replicas_in_sync=workers,
    )


def distribute_batch(strategy, batch):
    """Split this worker's batch evenly over its replicas (a no-op with one replica)."""
    n = local_replicas(strategy)
    if n == 1:
        return batch
    parts = tf.split(batch, n)
    first = worker_id(strategy) * n

    def part(context):
        return tf.identity(parts[context.replica_id_in_sync_group - first])

    return strategy.experimental_distribute_values_from_function(part)


def sum_over_workers(strategy, values):
    """Add per-worker Python numbers over all workers (every worker must call it)."""
    first = worker_id(strategy) * local_replicas(strategy)
    local = tf.constant(values, tf.float64)

    def contribution(context):  # one replica per worker contributes its worker's numbers
        own = context.replica_id_in_sync_group == first
        return tf.identity(local) if own else tf.zeros_like(local)

    per_replica = strategy.experimental_distribute_values_from_function(contribution)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy().tolist()


@contextlib.contextmanager
def precision_policy(name):
    """Set the global Keras dtype policy (build models inside), restoring the previous one."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def make_train_step(model, strategy):
    """One ``tf.function``: ``model.train_step`` on every replica, logs reduced across them."""

    @graph_optimization.function(
        jit_compile=bool(model.config.jit_compile), reduce_retracing=True, cache_graph=True
    )
    def train_step(batch):
        logs = strategy.run(model.train_step, args=(batch,))

        def reduce(value):
            # Counters arrive as optimizer variables, identical on every replica.
            first = tf.convert_to_tensor(strategy.experimental_local_results(value)[0])
            if first.dtype.is_floating:
                return strategy.reduce("MEAN", value, axis=None)
            return first

        return {name: reduce(value) for name, value in logs.items()}

    return train_step
