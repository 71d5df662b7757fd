"""Per-image transforms shared by every dataset: MNIST padding, resizing, flips, bit depth.

Images stay uint8 until the last step so that quantization is exact integer arithmetic; the
random steps (flip, dynamic binarization) are stateless ops keyed by a per-element seed, so a
pipeline is reproducible from its seed and position yet draws fresh noise on every read.
"""

import tensorflow as tf


def pad_mnist(image):
    """28x28 -> 32x32 with a 2-pixel zero border, as the original's ``Pad(padding=2)``."""
    return tf.pad(image, [[2, 2], [2, 2], [0, 0]])


def resize_to(image, size):
    """Resize a uint8 HWC image to ``size`` x ``size`` (antialiased bilinear, like PIL's resize).

    Rounds back to uint8 as PIL does; images already at that size pass through untouched.
    """

    def resize():
        out = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    out = tf.cond(same, lambda: image, resize)
    return tf.ensure_shape(out, [size, size, image.shape[-1]])


def random_flip(image, seed):
    """Horizontal flip with probability 1/2, keyed by a stateless seed of shape [2]."""
    return tf.image.stateless_random_flip_left_right(image, seed)


def quantize(image, num_bits):
    """uint8 image -> float32 in [0, 1] on the grid {0..2^bits-1}/(2^bits-1) (docs/design.md#data).

    ``floor(255 x / 2^(8-bits)) / (2^bits - 1)`` with ``x = u/255`` is ``(u >> (8-bits)) / (2^bits-1)``;
    the integer form avoids float rounding. 8 bits is plain ``u / 255``.
    """
    levels = tf.bitwise.right_shift(tf.cast(image, tf.int32), 8 - num_bits)
    return tf.cast(levels, tf.float32) / float(2**num_bits - 1)


def binarize(image, seed):
    """Dynamic binarization: each pixel is 1 with probability u/255 (a fresh Bernoulli draw).

    Zero pixels (e.g. the MNIST padding) always stay 0.
    """
    p = tf.cast(image, tf.float32) / 255.0
    u = tf.random.stateless_uniform(tf.shape(p), seed=seed)
    return tf.cast(u < p, tf.float32)


def to_model_input(image, seed, *, num_bits, flip):
    """uint8 HWC image -> float32 in [0, 1]: optional flip, then binarization or bit reduction."""
    seed = tf.cast(seed, tf.int64)
    if flip:
        image = random_flip(image, tf.stack([seed, tf.constant(0, tf.int64)]))
    if num_bits == 1:
        return binarize(image, tf.stack([seed, tf.constant(1, tf.int64)]))
    return quantize(image, num_bits)
