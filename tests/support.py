"""Tiny NVAE configs and inputs that build and step in seconds on 2 CPU cores.

``tiny_config(**overrides)`` is a binarized-MNIST config (Bernoulli output, 32x32x1) with
base width 4, one pre/post-process block of two cells, two latent scales with groups [1, 2]
(top first) and 20 latent channels per group, as in the paper. ``colour_config(**overrides)``
is its RGB counterpart: an image folder at 16x16x3, 8 bits, logistic mixture output, one flow
pair per group. Test modules import these helpers; conftest.py holds only the fixtures.
"""

import os

import numpy as np
import tensorflow as tf

from nvae_tf.config import NVAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CONFIG = os.path.join(ROOT, "configs", "small.yaml")
# ``--set`` items that shrink configs/small.yaml to seconds per command-line run (one scale,
# two groups, four channels, one down-sampling block); each test adds its batch size and epochs.
SMALL_SHRUNK = [
    "num_channels_enc=4",
    "num_channels_dec=4",
    "num_latent_scales=1",
    "num_preprocess_blocks=1",
    "num_postprocess_blocks=1",
    "num_groups_per_scale=2",
    "num_preprocess_cells=1",
    "num_postprocess_cells=1",
    "num_latent_per_group=4",
]

TINY = {
    "dataset": "bundled_mnist",
    "image_size": 32,
    "image_channels": 1,
    "num_x_bits": 1,
    "decoder": "bernoulli",
    "num_channels_enc": 4,
    "num_channels_dec": 4,
    "num_preprocess_blocks": 1,
    "num_preprocess_cells": 2,
    "num_postprocess_blocks": 1,
    "num_postprocess_cells": 2,
    "num_cell_per_cond_enc": 1,
    "num_cell_per_cond_dec": 1,
    "num_latent_scales": 2,
    "num_groups_per_scale": 2,
    "ada_groups": True,
    "min_groups_per_scale": 1,
    "num_latent_per_group": 20,
    "num_nf": 0,
    "use_se": True,
    "res_dist": True,
    "batch_size": 4,
    "epochs": 2,
    "warmup_epochs": 0,
    "weight_decay_norm": 1e-2,
    "seed": 1,
}

COLOUR = dict(
    TINY,
    dataset="folder",
    image_size=16,
    image_channels=3,
    num_x_bits=8,
    decoder="logistic_mixture",
    num_mixture_dec=10,
    num_nf=1,
)


def tiny_config(**overrides):
    """Tiny Bernoulli config (bundled MNIST layout), any field overridable."""
    return NVAEConfig.from_dict({**TINY, **overrides})


def colour_config(**overrides):
    """Tiny RGB config (16x16x3, 8-bit logistic mixture, one flow pair per group)."""
    return NVAEConfig.from_dict({**COLOUR, **overrides})


def binary_images(batch, size=32, seed=0):
    """Random binary images (B, size, size, 1), float32."""
    rng = np.random.default_rng(seed)
    return tf.constant((rng.random((batch, size, size, 1)) > 0.5).astype("float32"))


def colour_images(batch, size=16, bits=8, seed=0):
    """Random quantized RGB images (B, size, size, 3) in [0, 1], float32."""
    rng = np.random.default_rng(seed)
    levels = 2**bits - 1
    return tf.constant(
        (rng.integers(0, levels + 1, (batch, size, size, 3)) / levels).astype("float32")
    )


SEED = 1234  # the global seed of the ``seeded`` fixture


def truncate_image(path):
    """Cut an image file's last 40 bytes: its header intact (the up-front check passes), its
    last pixels gone (only decoding finds it)."""
    path.write_bytes(path.read_bytes()[:-40])


def depends_on(op, target):
    """Whether graph op ``op`` is ``target`` or runs after it (data or control edges)."""
    seen, todo = set(), [op]
    while todo:
        current = todo.pop()
        if current is target:
            return True
        if current.name not in seen:
            seen.add(current.name)
            todo += [t.op for t in current.inputs] + list(current.control_inputs)
    return False


def scaler_module(**function_kwargs):
    """A ``tf.Module`` class whose ``__call__`` (``factor * x``) is a
    ``graph_optimization.function(**function_kwargs)`` method."""
    from nvae_tf import graph_optimization

    class Scaler(tf.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = tf.Variable(factor)

        @graph_optimization.function(**function_kwargs)
        def __call__(self, x):
            return self.factor * x

    return Scaler
