"""Shared fixtures: tiny NVAE configs and models that build and step in seconds on 2 CPU cores.

``tiny_config(**overrides)`` is a binarized-MNIST config (Bernoulli decoder, 32x32x1) with
base width 4, one pre/post-process block of two cells, two latent scales with groups [1, 2]
(top first) and 20 latent channels per group, as in the paper. ``colour_config(**overrides)``
is its RGB counterpart: an image folder at 16x16x3, 8 bits, logistic mixture decoder, one flow
pair per group. Both are plain functions (import them with ``from conftest import ...``) and
fixtures of the same name returning the function.

``bernoulli_model`` / ``colour_model`` are session-wide built models for READ-ONLY tests
(shapes, sampling, seeds): a test that changes weights must build its own.

``seeded`` fixes the Keras/TensorFlow/NumPy/Python seeds for a test (the model test modules
use it for every test, and seed their shared models too), so random weights and inputs, and
with them every numerical margin, are the same from run to run.

Every test ends with the float32 Keras policy restored, whatever it set.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.config import NVAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CONFIG = os.path.join(ROOT, "configs", "small.yaml")
# ``--set`` items that shrink configs/small.yaml to seconds per command-line run (one scale,
# two groups, four channels); each test adds its batch size and epochs.
SMALL_SHRUNK = [
    "num_channels_enc=4",
    "num_channels_dec=4",
    "num_latent_scales=1",
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


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(name="colour_config")
def _colour_config_fixture():
    return colour_config


SEED = 1234


@pytest.fixture
def seeded():
    """Fixed global seeds for one test."""
    keras.utils.set_random_seed(SEED)


@pytest.fixture(scope="session")
def bernoulli_model():
    from nvae_tf.model import NVAE

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(SEED + 1)
    return NVAE(tiny_config())


@pytest.fixture(scope="session")
def colour_model():
    from nvae_tf.model import NVAE

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(SEED + 2)
    return NVAE(colour_config())


@pytest.fixture(autouse=True)
def _restore_float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")
