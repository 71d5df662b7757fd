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
import re
import shutil
import sys

import tensorflow as tf

from nvae_tf.config import ConfigError, NVAEConfig

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


def load_run_config(run_dir):
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


def remove_partial_saves(directory):
    """Delete ``*_temp`` folders a save killed mid-write left behind (never a valid checkpoint)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith("_temp"):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def checkpoint_problem(path):
    """Why the checkpoint ``path`` (a ``ckpt-N`` prefix) cannot be read, in a few words; None
    when every tensor reads back (TensorFlow checks each one's CRC-32C as it reads it).

    Reading all of it costs one pass over the files; a truncated or corrupt checkpoint would
    otherwise fail half-way through a restore with an error that names no file.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # truncation, CRC mismatch, missing shard: all mean "unusable"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else 'unreadable'}"
    return None


def checkpoints_newest_first(directory):
    """Every ``ckpt-N`` prefix in ``directory`` with an index file, highest N first."""
    found = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            match = re.fullmatch(r"ckpt-(\d+)\.index", name)
            if match:
                found.append((int(match.group(1)), os.path.join(directory, name[: -len(".index")])))
    return [path for _, path in sorted(found, reverse=True)]


def intact_checkpoint(directory):
    """The newest checkpoint in ``directory`` that reads back whole, or None if there is none.

    Each newer, unreadable one is named in a one-line warning on stderr; if checkpoints exist
    but none is intact, raises ``RunDirectoryError`` naming the newest and why.
    """
    candidates = checkpoints_newest_first(directory)
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in problems:
                print(
                    f"warning: checkpoint {bad} is unreadable ({why}); using {path} instead",
                    file=sys.stderr,
                )
            return path
        problems.append((path, problem))
    if problems:
        bad, why = problems[0]
        raise RunDirectoryError(
            f"no intact checkpoint in {directory}: {len(problems)} found, all unreadable "
            f"(newest {bad}: {why})"
        )
    return None


def latest_checkpoint(run_dir):
    """The newest intact checkpoint of a run (see ``intact_checkpoint``)."""
    path = intact_checkpoint(checkpoint_dir(run_dir))
    if path is None:
        raise RunDirectoryError(
            f"no checkpoint in {checkpoint_dir(run_dir)}: has training saved one yet?"
        )
    return path


def restore_model(run_dir, use_ema=True, config=None, path=None):
    """Rebuild the model of a run and load its latest weights (EMA weights if trained with EMA).

    ``config`` may override the saved one (e.g. a different precision); the architecture
    fields must match the checkpoint. ``path``: the checkpoint to load (default: the newest
    intact one, ``latest_checkpoint``).
    """
    from nvae_tf.model import NVAE
    from nvae_tf.training.guarded_optimizer import make_optimizer, moving_averages

    config = config or load_run_config(run_dir)
    path = path or latest_checkpoint(run_dir)
    model = NVAE(config)
    objects = {"model": model}
    if use_ema and config.ema_decay > 0:
        optimizer = make_optimizer(config, steps_per_epoch=1)
        optimizer.build(model.trainable_variables)
        objects["optimizer"] = optimizer
    tf.train.Checkpoint(**objects).restore(path).expect_partial()
    if "optimizer" in objects:
        for variable, average in zip(
            model.trainable_variables, moving_averages(objects["optimizer"])
        ):
            variable.assign(average)
    return model
