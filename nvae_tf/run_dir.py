"""The run directory written by ``nvae-train`` and read by every other tool.

Layout::

    RUN/config.yaml           the config actually used (NVAEConfig.to_yaml)
    RUN/checkpoints/ckpt-N.*  tf.train.CheckpointManager checkpoints; each holds ``model``
                              (weights, spectral u/v, noise generator) and ``optimizer``
                              (step, moments, loss scale, EMA weights) plus training state
    RUN/metrics.csv           one row per logged step
    RUN/tensorboard/          TensorBoard event files

``check_run_dir`` decides whether a directory may take a new run or continue one.
"""

import dataclasses
import os
import shutil
from typing import TYPE_CHECKING

import tensorflow as tf

from nvae_tf.config import ARCHITECTURE_FIELDS, ConfigError, NVAEConfig

if TYPE_CHECKING:
    from nvae_tf.model import NVAE

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
# The config fields a resumed run may change; all others must equal the run's config.yaml.
RESUMABLE_KEYS = ("data_dir", "precision", "recompute", "jit_compile", "max_skipped_steps")


class RunDirectoryError(FileNotFoundError):
    """A path that is not a usable ``nvae-train`` output directory (one-line message)."""


def config_path(run_dir):
    return os.path.join(run_dir, CONFIG_FILE)


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, CHECKPOINT_DIR)


def load_run_config(run_dir: str) -> NVAEConfig:
    path = config_path(run_dir)
    if not os.path.isfile(path):
        raise RunDirectoryError(
            f"{run_dir} has no {CONFIG_FILE}: pass the --out directory of an nvae-train run"
        )
    return NVAEConfig.from_yaml(path)


def check_run_dir(run_dir, config, resume):
    """Check that ``run_dir`` can take a new run or, with ``resume``, holds one that ``config``
    continues; returns the run's saved config when resuming, else None."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirectoryError(f"--out {run_dir} exists and is not a directory")
    has_config = os.path.isfile(config_path(run_dir))
    saves = checkpoint_dir(run_dir)
    has_checkpoints = os.path.isdir(saves) and bool(os.listdir(saves))
    if not resume:
        if has_config or has_checkpoints:
            raise RunDirectoryError(
                f"{run_dir} already holds a run: pass --resume to continue "
                "it, or choose a new --out"
            )
        return None
    if not has_config:
        raise RunDirectoryError(
            f"--resume: {run_dir} holds no run ({config_path(run_dir)} is "
            "missing); drop --resume to start one"
        )
    saved = NVAEConfig.from_yaml(config_path(run_dir))
    conflicts = [
        f"{f.name} (run: {getattr(saved, f.name)!r}, now: {getattr(config, f.name)!r})"
        for f in dataclasses.fields(saved)
        if f.name not in RESUMABLE_KEYS and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if conflicts:
        raise ConfigError(
            f"--resume: the config differs from {config_path(run_dir)} in "
            f"{', '.join(conflicts)}; only {', '.join(RESUMABLE_KEYS)} may "
            "change when resuming"
        )
    return saved


def check_init_from(run_dir, config):
    """Check that ``run_dir`` has a checkpoint of ``config``'s model; returns its path.

    For warm starts (``nvae-train --init-from``): the architecture must agree, everything
    else (dataset, training fields) may differ.
    """
    source = load_run_config(run_dir)
    conflicts = [
        f"{name} ({getattr(source, name)!r} there, {getattr(config, name)!r} here)"
        for name in ARCHITECTURE_FIELDS
        if getattr(source, name) != getattr(config, name)
    ]
    if conflicts:
        raise ConfigError(
            f"--init-from {run_dir}: its model has another architecture: {', '.join(conflicts)}"
        )
    return latest_checkpoint(run_dir)


def remove_partial_saves(directory):
    """Delete ``*_temp`` folders a save killed mid-write left behind (never a valid checkpoint)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith("_temp"):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def latest_checkpoint(run_dir: str) -> str:
    path = tf.train.latest_checkpoint(checkpoint_dir(run_dir))
    if path is None:
        raise RunDirectoryError(
            f"no checkpoint in {checkpoint_dir(run_dir)}: has training saved one yet?"
        )
    return path


def restore_model(run_dir: str, use_ema: bool = True, config: NVAEConfig | None = None) -> "NVAE":
    """Rebuild the model of a run and load its latest weights (EMA weights if trained with EMA).

    ``config`` may override the saved one (e.g. a different precision); the architecture
    fields must match the checkpoint.
    """
    from nvae_tf.model import NVAE
    from nvae_tf.training.guarded_optimizer import make_optimizer

    config = config or load_run_config(run_dir)
    path = latest_checkpoint(run_dir)
    model = NVAE(config)
    objects = {"model": model}
    if use_ema and config.ema_decay > 0:
        optimizer = make_optimizer(config, steps_per_epoch=1)
        optimizer.build(model.trainable_variables)
        objects["optimizer"] = optimizer
    tf.train.Checkpoint(**objects).restore(path).expect_partial()
    if "optimizer" in objects:  # the weights become their moving averages
        objects["optimizer"].finalize_variable_values(model.trainable_variables)
    return model
