"""The run directory written by ``nvae-train`` and read by every other tool.

Layout::

    RUN/config.yaml           the config actually used (NVAEConfig.to_yaml)
    RUN/checkpoints/ckpt-N.*  tf.train.CheckpointManager checkpoints; each holds ``model``
                              (weights, spectral u/v, noise generator) and ``optimizer``
                              (step, moments, loss scale, EMA weights) plus training state
    RUN/metrics.csv           one row per logged step
    RUN/tensorboard/          TensorBoard event files
"""
import os

import tensorflow as tf

from nvae_tf.config import NVAEConfig

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


class RunDirectoryError(FileNotFoundError):
    """A path that is not a usable ``nvae-train`` output directory (one-line message)."""


def config_path(run_dir):
    return os.path.join(run_dir, CONFIG_FILE)


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, CHECKPOINT_DIR)


def load_run_config(run_dir):
    path = config_path(run_dir)
    if not os.path.isfile(path):
        raise RunDirectoryError(f"{run_dir} has no {CONFIG_FILE}: pass the --out directory of "
                                "an nvae-train run")
    return NVAEConfig.from_yaml(path)


def latest_checkpoint(run_dir):
    path = tf.train.latest_checkpoint(checkpoint_dir(run_dir))
    if path is None:
        raise RunDirectoryError(f"no checkpoint in {checkpoint_dir(run_dir)}: has training "
                                "saved one yet?")
    return path


def restore_model(run_dir, use_ema=True, config=None):
    """Rebuild the model of a run and load its latest weights (EMA weights if trained with EMA).

    ``config`` may override the saved one (e.g. a different precision); the architecture
    fields must match the checkpoint.
    """
    from nvae_tf.guarded_optimizer import make_optimizer
    from nvae_tf.model import NVAE

    config = config or load_run_config(run_dir)
    path = latest_checkpoint(run_dir)
    model = NVAE(config)
    objects = {"model": model}
    if use_ema and config.ema_decay > 0:
        optimizer = make_optimizer(config, steps_per_epoch=1)
        optimizer.build(model.trainable_variables)
        objects["optimizer"] = optimizer
    tf.train.Checkpoint(**objects).restore(path).expect_partial()
    if "optimizer" in objects:
        averages = objects["optimizer"].inner_optimizer._model_variables_moving_average
        for variable, average in zip(model.trainable_variables, averages):
            variable.assign(average)
    return model
