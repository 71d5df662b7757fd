"""Tiny run directories for the evaluation, sampling and export tests.

A run directory is what ``nvae-train`` writes: RUN/config.yaml and a tf.train.CheckpointManager
folder RUN/checkpoints holding ``model`` and the built ``optimizer``. The models are untrained
(fresh initialisation), which is all the agreement and plumbing checks need. Configs come
from support.py's ``tiny_config`` / ``colour_config`` (a colour run needs a ``data_dir``, e.g.
from ``write_colour_folder``).
"""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from nvae_tf import NVAE
from nvae_tf.run_dir import checkpoint_dir, config_path
from nvae_tf.training.guarded_optimizer import make_optimizer


def write_colour_folder(root, image_size=16, num_train=8, num_test=12, seed=0, fmt="PNG"):
    """Random RGB images (PNG or ``fmt``) in root/train and root/test, named 000.png, ..."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", num_test)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, f"{i:03d}.{fmt.lower()}"), fmt)
    return root


class Run:
    """A run directory with a checkpoint manager, so tests can add newer checkpoints."""

    def __init__(self, run_dir, config):
        self.dir = str(run_dir)
        self.config = config
        os.makedirs(self.dir, exist_ok=True)
        config.to_yaml(config_path(self.dir))
        self.model = NVAE(config)
        optimizer = make_optimizer(config, steps_per_epoch=1)
        optimizer.build(self.model.trainable_variables)
        self.manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=self.model, optimizer=optimizer),
            checkpoint_dir(self.dir),
            max_to_keep=3,
        )
        self.save()

    def save(self):
        return self.manager.save()
