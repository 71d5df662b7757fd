"""Times a 1x1 convolution's forward + backward as oneDNN's conv and as one matmul.

The measurement behind ``nvae_tf.layers.linear_ops.pointwise_conv2d`` (docs/design.md#speed),
on NVAE's decoder-cell shapes at batch 16: ``python benchmarks/pointwise_conv.py``.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

from nvae_tf.layers.linear_ops import pointwise_conv2d

SHAPES = ((8, 256, 1536), (8, 1536, 256), (16, 128, 768), (16, 768, 128), (32, 64, 384))


def forward_backward(conv):
    @tf.function
    def run(x, kernel, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel)
        return tape.gradient(y, [x, kernel], output_gradients=dy)

    return run


def milliseconds(fn, args, calls):
    fn(*args)  # trace and warm up
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    _ = [t.numpy() for t in out]
    return (time.perf_counter() - start) / calls * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    conv = forward_backward(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
    matmul = forward_backward(pointwise_conv2d)
    print("size  C_in -> C_out   conv ms   matmul ms   speed-up")
    for size, cin, cout in SHAPES:
        x = tf.random.normal((args.batch, size, size, cin))
        kernel = tf.random.normal((1, 1, cin, cout))
        dy = tf.random.normal((args.batch, size, size, cout))
        a = milliseconds(conv, (x, kernel, dy), args.calls)
        b = milliseconds(matmul, (x, kernel, dy), args.calls)
        print(f"{size:4d}  {cin:4d} -> {cout:<6d} {a:8.2f}   {b:9.2f}   {a / b:6.2f}x")


if __name__ == "__main__":
    main()
