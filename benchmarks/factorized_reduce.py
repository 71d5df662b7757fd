"""Times ``FactorizedReduce`` forward + backward with its two ways of reading the views.

The measurement behind its space_to_depth path (docs/design.md#speed): static even sizes take
it; an input signature with unknown sizes forces the shifted slices.
``python benchmarks/factorized_reduce.py``.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

from nvae_tf.layers.skips import FactorizedReduce

SHAPES = ((16, 32, 32, 64), (16, 16, 16, 128), (4, 32, 32, 128))  # (batch, H, W, channels in)


def forward_backward(layer, signature=None):
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, *layer.trainable_variables], output_gradients=y)

    return tf.function(run, input_signature=signature)


def median_ms(fn, x, calls):
    fn(x)  # trace and warm up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        [g.numpy() for g in fn(x)]
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args(argv)
    print("shape                   slices ms  phases ms")
    for shape in SHAPES:
        layer = FactorizedReduce(2 * shape[-1])
        x = tf.random.stateless_normal(shape, seed=[1, 2])
        layer(x)
        unknown = [tf.TensorSpec((shape[0], None, None, shape[-1]))]
        slices = median_ms(forward_backward(layer, unknown), x, args.calls)
        phases = median_ms(forward_backward(layer), x, args.calls)
        print(f"{shape!s:22s} {slices:10.2f} {phases:10.2f}")


if __name__ == "__main__":
    main()
