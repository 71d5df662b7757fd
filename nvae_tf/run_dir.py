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
import glob
import os
import re
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

from nvae_tf.config import ARCHITECTURE_FIELDS, ConfigError, NVAEConfig
from nvae_tf.tf_messages import captured_stderr_fd, one_line

if TYPE_CHECKING:
    from nvae_tf.model import NVAE

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
RUN_LOGS = ("metrics.csv", "tensorboard")
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
    continues; returns the run's saved config when resuming one, else None (with ``resume``
    too when ``run_dir`` holds no run yet: a supervisor can always pass ``--resume``)."""
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
        if has_checkpoints:
            raise RunDirectoryError(
                f"--resume: {run_dir} has checkpoints but no {CONFIG_FILE}; restore it, "
                "or choose a new --out"
            )
        return None  # nothing to continue: the caller starts the run from scratch
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


def check_writable(path, what="--out"):
    """Raise ``RunDirectoryError`` unless the directory ``path`` exists and takes new files, or
    can be created; checked by creating and removing a probe, since permission bits do not
    show read-only mounts, /sys or /proc. Leaves nothing behind."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunDirectoryError(f"{what} {path}: {existing} exists and is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".nvae-write-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        raise RunDirectoryError(
            f"{what} {path} is not writable ({e.strerror or e} in {existing}); choose a "
            "writable folder"
        ) from None


def remove_failed_start(run_dir, created):
    """Undo what a new run wrote before failing, if it saved no checkpoint: ``config.yaml``,
    logs and ``checkpoints/`` go (and ``run_dir`` itself if ``created`` and now empty), so the
    same command can be run again. A run with a checkpoint is kept for ``--resume``."""
    if checkpoints_newest_first(checkpoint_dir(run_dir)):
        return
    for name in (CONFIG_FILE, *RUN_LOGS, CHECKPOINT_DIR):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    if created and os.path.isdir(run_dir) and not os.listdir(run_dir):
        os.rmdir(run_dir)


def remove_partial_saves(directory):
    """Delete what saves killed mid-write left behind: ``*_temp`` folders, and the files of
    any ``ckpt-N`` that the state file does not list and that does not read back whole."""
    if not os.path.isdir(directory):
        return
    names = os.listdir(directory)
    for name in names:
        if name.endswith("_temp"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    listed = _listed(directory) or set()
    for _, prefix in _numbered(names):
        path = os.path.join(directory, prefix)
        if prefix not in listed and checkpoint_problem(path) is not None:
            for name in glob.glob(glob.escape(path) + ".*"):
                if not name.endswith(".unreadable"):
                    os.remove(name)


def checkpoint_problem(path):
    """Why the checkpoint ``path`` (a ``ckpt-N`` prefix) cannot be read, in a few words; None
    when every tensor reads back (TensorFlow checks each one's CRC-32C as it reads it).

    Reading all of it costs one pass over the files; a truncated or corrupt checkpoint would
    otherwise fail half-way through a restore with an error that names no file.
    """
    import tensorflow as tf

    with captured_stderr_fd():  # TensorFlow also logs the failed read: we report it ourselves
        try:
            reader = tf.train.load_checkpoint(path)
            for name, dtype in reader.get_variable_to_dtype_map().items():
                # RestoreV2 also reads variant tensors (the data iterator), unlike get_tensor.
                tf.raw_ops.RestoreV2(
                    prefix=path, tensor_names=[name], shape_and_slices=[""], dtypes=[dtype]
                )
        except Exception as e:  # truncation, CRC mismatch, missing shard: all mean "unusable"
            return f"{type(e).__name__}: {one_line(e)}"
    return None


def checkpoints_newest_first(directory):
    """The completed ``ckpt-N`` prefixes in ``directory``, highest N first.

    Completed means listed in the ``checkpoint`` state file, which ``CheckpointManager``
    rewrites only after a save finished (TensorFlow writes ``ckpt-N.index`` in place, so a kill
    during a save can leave a partial one). Without a readable state file, every ``ckpt-N``
    with an index file counts.
    """
    found = _numbered(os.listdir(directory) if os.path.isdir(directory) else [])
    listed = _listed(directory)
    if listed is not None:
        found = [(n, name) for n, name in found if name in listed]
    return [os.path.join(directory, name) for _, name in sorted(found, reverse=True)]


def _listed(directory):
    """The ``ckpt-N`` names the state file lists; None without a readable state file."""
    import tensorflow as tf

    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:  # a damaged state file: the caller falls back to the files themselves
        return None
    return (
        None if state is None else {os.path.basename(p) for p in state.all_model_checkpoint_paths}
    )


def _numbered(names):
    """(N, "ckpt-N") for each ``ckpt-N.index`` among ``names``."""
    matches = (re.fullmatch(r"(ckpt-(\d+))\.index", name) for name in names)
    return [(int(m.group(2)), m.group(1)) for m in matches if m]


def intact_checkpoint(directory, set_aside=False):
    """The newest checkpoint in ``directory`` that reads back whole, or None if there is none.

    Each newer, unreadable one is named in a one-line warning on stderr; with ``set_aside``
    (a run that will save again) its files are renamed to ``*.unreadable``, so that they are
    neither listed again nor counted among the checkpoints kept. If checkpoints exist but
    none is intact, raises ``RunDirectoryError`` naming the newest and why.
    """
    problems = []
    for path in checkpoints_newest_first(directory):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in problems:
                note = f"using {path} instead"
                if set_aside:
                    for name in glob.glob(glob.escape(bad) + ".*"):
                        os.replace(name, name + ".unreadable")
                    note += f"; its files are renamed to {os.path.basename(bad)}.*.unreadable"
                print(f"warning: checkpoint {bad} is unreadable ({why}); {note}", file=sys.stderr)
            return path
        problems.append((path, problem))
    if problems:
        bad, why = problems[0]
        raise RunDirectoryError(
            f"no intact checkpoint in {directory}: {len(problems)} found, all unreadable "
            f"(newest {bad}: {why})"
        )
    return None


def latest_checkpoint(run_dir: str) -> str:
    """The newest intact checkpoint of a run (see ``intact_checkpoint``)."""
    path = intact_checkpoint(checkpoint_dir(run_dir))
    if path is None:
        raise RunDirectoryError(
            f"no checkpoint in {checkpoint_dir(run_dir)}: has training saved one yet?"
        )
    return path


def restore_model(
    run_dir: str,
    use_ema: bool = True,
    config: NVAEConfig | None = None,
    path: str | None = None,
) -> "NVAE":
    """Rebuild the model of a run and load its latest weights (EMA weights if trained with EMA).

    ``config`` may override the saved one (e.g. a different precision); the architecture
    fields must match the checkpoint. ``path``: the checkpoint to load (default: the newest
    intact one, ``latest_checkpoint``).
    """
    import tensorflow as tf

    from nvae_tf.model import NVAE
    from nvae_tf.training.guarded_optimizer import make_optimizer

    config = config or load_run_config(run_dir)
    path = path or latest_checkpoint(run_dir)
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
