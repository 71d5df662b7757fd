"""What is live at a training step's memory peak, by the op that made it.

Profiles one training step with TensorFlow's profiler (``host_tracer_level=3`` records the
CPU allocator's allocations) and prints its ``memory_profile`` tool's view of the peak: the
live allocations grouped by op name (numbers folded, the first ``--depth`` name scopes kept),
largest first, then the largest single tensors. This is how docs/design.md#memory found what
a step held. Needs a few minutes on a paper config.

    python benchmarks/memory_profile.py --config configs/mnist.yaml --batch-size 16
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def live_at_peak(profile):
    """``(peak_bytes, [(bytes, op_name, shape)])`` from a ``memory_profile`` tool result."""
    allocator = next(iter(profile["memoryProfilePerAllocator"].values()))
    snapshots, special = allocator["memoryProfileSnapshots"], allocator.get("specialAllocations")
    rows = []
    for active in allocator["activeAllocations"]:
        index = int(active["snapshotIndex"])
        meta = snapshots[index]["activityMetadata"] if index >= 0 else None
        if meta is None:
            meta = special[int(active["specialIndex"])]
        count = int(active.get("numOccurrences", 1))
        rows.append((int(meta["allocationBytes"]) * count, meta["tfOpName"], meta["tensorShape"]))
    peak = int(allocator["profileSummary"]["peakStats"]["peakBytesInUse"])
    return peak, sorted(rows, reverse=True)


def grouped(rows, depth):
    """Bytes per op-name pattern: numbers folded (``cell_3/mul_2`` -> ``cell/mul``)."""
    totals, counts = collections.Counter(), collections.Counter()
    for size, name, _ in rows:
        key = "/".join(re.sub(r"(_\d+)+$", "", part) for part in name.split("/")[:depth])
        totals[key] += size
        counts[key] += 1
    return [(size, counts[key], key) for key, size in totals.most_common()]


def profile_step(config_path, batch_size, logdir):
    """Build, compile and run two steps, then profile a third; returns the tool's JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    from nvae_tf import NVAE, NVAEConfig
    from nvae_tf.training.distribute import make_train_step

    config = NVAEConfig.from_yaml(config_path).replace(batch_size=batch_size)
    model = NVAE(config)
    model.compile(steps_per_epoch=1000)
    model.optimizer.build(model.trainable_variables)
    shape = (batch_size, config.image_size, config.image_size, config.image_channels)
    x = tf.cast(tf.random.stateless_uniform(shape, seed=[1, 2]) > 0.5, tf.float32)
    step = make_train_step(model, tf.distribute.get_strategy())
    for _ in range(2):
        float(step(x)["loss"])
    options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=3)
    tf.profiler.experimental.start(logdir, options=options)
    float(step(x)["loss"])
    tf.profiler.experimental.stop()
    planes = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    return json.loads(plugin.xspace_to_tools_data(planes, "memory_profile", {})[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=4, help="name scopes kept when grouping")
    p.add_argument("--top", type=int, default=25, help="rows per listing")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config):
        print(f"error: no config file {args.config}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nvae-memory-profile-") as logdir:
        peak, rows = live_at_peak(profile_step(args.config, args.batch_size, logdir))
    print(f"allocator peak {peak / 2**20:.0f} MB, {len(rows)} live allocations")
    for size, count, key in grouped(rows, args.depth)[: args.top]:
        print(f"{size / 2**20:9.1f} MB  {count:4d} x  {key}")
    print("largest:")
    for size, name, shape in rows[: args.top]:
        print(f"{size / 2**20:9.1f} MB  {name} {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
