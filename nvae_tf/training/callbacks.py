"""Keras callbacks of an NVAE run: diagnostics, skip guard, CSV, TensorBoard, progress.

They work under ``model.fit`` and under ``nvae-train``'s resumable loop alike. Order matters:
``TrainingDiagnostics`` goes first, because it adds to the shared ``logs`` dict what the sinks
write (the current beta, lambda and learning rate on every step; per-group KL and active units at
logged steps, which it marks with a ``step`` key). The global step used throughout is the number
of training batches consumed: applied steps (``optimizer.iterations``) plus skipped ones.
Checkpoints: ``nvae_tf.training.checkpointing.CheckpointSaver``.
"""

import csv
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from nvae_tf.files import write_atomically
from nvae_tf.inference.image_grid import grid
from nvae_tf.model import ACTIVE_KL_THRESHOLD
from nvae_tf.training.checkpointing import global_step
from nvae_tf.training.guarded_optimizer import schedule_step
from nvae_tf.training.schedules import kl_coefficient, regularizer_weight

SAMPLE_TEMPERATURES = (0.7, 0.8, 0.9, 1.0)  # as the original's grids, docs/design.md#training-loop
PROBE_SEED = (2020, 1)  # fixed noise for logging passes: they never touch the model's generator
TRAIN_COLUMNS = (
    "loss",
    "nelbo",
    "bpd",
    "recon",
    "kl",
    "grad_norm",
    "spectral",
    "bn_penalty",
    "beta",
    "reg_weight",
    "learning_rate",
    "skipped_steps",
)
TEST_COLUMNS = ("val_nelbo", "val_bpd")


def metric_columns(config):
    """Columns of ``metrics.csv`` (the step first; ``val_*`` only filled at evaluated epochs)."""
    groups = range(config.num_groups)
    return (
        ("step", "epoch", "wall_time")
        + TRAIN_COLUMNS
        + ("active_units",)
        + tuple(f"kl_group_{g}" for g in groups)
        + tuple(f"active_units_group_{g}" for g in groups)
        + TEST_COLUMNS
    )


class TrainingDiagnostics(keras.callbacks.Callback):
    """Adds current schedule values to every step's logs, and latent diagnostics at logged steps.

    ``beta`` and ``reg_weight`` (lambda) are replaced by the values in effect for the next step
    (the model's trackers average them over the epoch), ``learning_rate`` is added. Every
    ``every_steps`` steps and at each epoch end, a forward pass on the fixed held-out batch
    ``probe_images`` (fixed noise, eval mode, outside the train step) adds ``kl_group_i`` (mean
    KL of group i, nats), ``active_units_group_i`` (channels with KL > 0.1) and their total
    ``active_units``, plus ``step`` and ``epoch``, which tells the sinks to write the row.
    """

    def __init__(self, probe_images, every_steps):
        super().__init__()
        self.probe_images = tf.convert_to_tensor(probe_images)
        self.every_steps = int(every_steps)
        self._probe = None
        self._schedule = None
        self._epoch = 0
        self._logged_step = None

    def on_train_begin(self, logs=None):
        self._logged_step = global_step(self.model)  # a resumed run logged this step already

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if logs is None:
            return
        logs.update(self._schedule_values())
        step = global_step(self.model)
        last_of_epoch = batch + 1 == self.params.get("steps")
        if step % self.every_steps == 0 and not last_of_epoch:  # epoch ends log in on_epoch_end
            logs.update(self._probe_values(step))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._schedule_values())
            logs.update(self._probe_values(global_step(self.model)))

    def on_train_end(self, logs=None):
        step = global_step(self.model)
        if logs is not None and step != self._logged_step:  # a run stopped between logged
            logs.update(self._schedule_values())  # steps still logs its last one
            logs.update(self._probe_values(step))

    def _schedule_values(self):
        if self._schedule is None:  # one compiled call per step instead of ~20 eager ops (~3 ms)
            model = self.model
            config = model.config

            @tf.function
            def schedule():
                beta = kl_coefficient(
                    schedule_step(model.optimizer),
                    model.objective.total_steps,
                    config.kl_anneal_portion,
                    config.kl_const_portion,
                    config.kl_const_coeff,
                )
                reg = regularizer_weight(
                    beta,
                    config.weight_decay_norm,
                    config.weight_decay_norm_anneal,
                    config.weight_decay_norm_init,
                )
                return beta, reg, tf.convert_to_tensor(model.optimizer.learning_rate)

            self._schedule = schedule
        beta, reg, learning_rate = (float(t) for t in self._schedule())
        return {"beta": beta, "reg_weight": reg, "learning_rate": learning_rate}

    def _probe_values(self, step):
        if self._probe is None:
            model = self.model

            @tf.function
            def probe(x):
                out = model(x, training=False, seed=PROBE_SEED)
                return tf.reduce_mean(out.kl, axis=0), out.kl_per_channel

            self._probe = probe
        self._logged_step = step
        kl, kl_per_channel = (t.numpy() for t in self._probe(self.probe_images))
        active = (kl_per_channel > ACTIVE_KL_THRESHOLD).sum(axis=1)
        values = {"step": step, "epoch": self._epoch, "active_units": int(active.sum())}
        for g in range(len(kl)):
            values[f"kl_group_{g}"] = float(kl[g])
            values[f"active_units_group_{g}"] = int(active[g])
        return values


class SkipGuard(keras.callbacks.Callback):
    """Stops training once ``max_consecutive`` optimizer steps in a row were non-finite.

    The guarded optimizer already skips such steps (weights untouched); a long streak means the
    run is stuck. ``message`` holds the one-line reason once triggered (``None`` otherwise).
    """

    def __init__(self, max_consecutive):
        super().__init__()
        self.max_consecutive = int(max_consecutive)
        self.message = None

    def on_train_begin(self, logs=None):
        self.message = None

    def on_train_batch_end(self, batch, logs=None):
        streak = int((logs or {}).get("consecutive_skips", 0))
        if streak >= self.max_consecutive:
            self.message = (
                f"training stopped at step {global_step(self.model)}: {streak} consecutive steps "
                f"had a non-finite loss or gradients ({int(logs.get('skipped_steps', streak))} "
                "skipped in all); lower learning_rate or set grad_clip_norm, then start again from "
                "the last checkpoint (or let nvae-train --rollbacks N do it)"
            )
            self.model.stop_training = True


class _RowWriter(keras.callbacks.Callback):
    """Hands each row to log to ``write_row``: the batch-end, epoch-end and train-end logs that
    ``TrainingDiagnostics`` marked with a ``step``."""

    def on_train_batch_end(self, batch, logs=None):
        self._row(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._row(logs)

    def on_train_end(self, logs=None):
        self._row(logs)

    def _row(self, logs):
        if logs and "step" in logs:
            self.write_row(logs)

    def write_row(self, logs):
        raise NotImplementedError


class CSVMetrics(_RowWriter):
    """Appends one row per logged step (rows marked by ``TrainingDiagnostics``) to ``path``.

    Each row is flushed at once, so a killed run keeps every row it logged; resuming drops the
    rows past the restored step (``truncate_after``).
    """

    def __init__(self, path, columns):
        super().__init__()
        self.path = path
        self.columns = tuple(columns)

    def write_row(self, logs):
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        row = {**logs, "wall_time": round(time.time(), 3)}
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _csv_value(row.get(k)) for k in self.columns})

    @staticmethod
    def truncate_after(path, step):
        """Keep the header and the complete rows with ``step <= step`` (atomic rewrite)."""
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        header, keep = rows[0], [rows[0]]
        for row in rows[1:]:
            if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= step:
                keep.append(row)
        write_atomically(path, lambda f: csv.writer(f).writerows(keep))


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


class TensorBoardScalars(_RowWriter):
    """Writes every numeric value of the logged rows as a TensorBoard scalar at their step.

    Tags: training values under their log names (``loss``, ``bpd``, ``beta``, ...), per-group
    values as ``kl_per_group/i`` and ``active_units_per_group/i``, held-out results as
    ``test/nelbo`` and ``test/bpd``.
    """

    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def write_row(self, logs):
        with self.writer.as_default(step=int(logs["step"])):
            for key, value in logs.items():
                if key in ("step", "epoch", "consecutive_skips") or not np.isscalar(value):
                    continue
                tf.summary.scalar(_scalar_tag(key), float(value))
        self.writer.flush()


def _scalar_tag(key):
    if key.startswith("val_"):
        return f"test/{key[4:]}"
    for prefix in ("kl_group_", "active_units_group_"):
        if key.startswith(prefix):
            return f"{prefix[:-7]}_per_group/{key[len(prefix) :]}"
    return key


class TensorBoardImages(keras.callbacks.Callback):
    """Image grids every ``every_steps`` steps and at the end of training (unless it ended on
    a non-finite step).

    ``reconstructions``: held-out inputs (left) next to their reconstructions (right), 4x4 each;
    ``samples/t=T``: 16 prior samples at each temperature, with the same fixed noise every time
    so the grids show how the model evolves.
    """

    def __init__(self, writer, probe_images, every_steps, temperatures=SAMPLE_TEMPERATURES):
        super().__init__()
        self.writer = writer
        self.images = tf.convert_to_tensor(probe_images[:16])
        self.every_steps = int(every_steps)
        self.temperatures = tuple(temperatures)
        self._last_step = None

    def on_train_begin(self, logs=None):
        self._last_step = global_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if step % self.every_steps == 0:
            self._write(step)

    def on_train_end(self, logs=None):
        step = global_step(self.model)
        diverging = int((logs or {}).get("consecutive_skips", 0)) > 0
        if step != self._last_step and not diverging:
            self._write(step)

    def _write(self, step):
        model = self.model
        inputs = self.images.numpy()
        recon = model.reconstruct(self.images, seed=PROBE_SEED).numpy()
        with self.writer.as_default(step=step):
            tf.summary.image("reconstructions", grid(side_by_side(inputs, recon))[None])
            for t in self.temperatures:
                samples = model.sample(16, temperature=t, seed=PROBE_SEED).numpy()
                tf.summary.image(f"samples/t={t:g}", grid(samples, columns=4)[None])
        self.writer.flush()
        self._last_step = step


def side_by_side(left, right, columns=4):
    """(rows, 2 * columns, H, W, C) layout: ``left`` images in the left half, ``right`` beside."""

    def blocks(images):
        n = len(images)
        padded = np.concatenate([images, np.zeros((-n % columns, *images.shape[1:]), images.dtype)])
        return padded.reshape(-1, columns, *images.shape[1:])

    return np.concatenate([blocks(left), blocks(right)], axis=1)


class ProgressBar(keras.callbacks.Callback):
    """Keras' progress bar with NVAE's headline numbers: loss, bits/dim, beta, skipped steps.

    ``verbose=1``: a live bar per epoch; ``verbose=2``: one line per epoch. The skipped-step
    count appears once it is non-zero; the held-out ``val_bpd`` on evaluated epochs' lines.
    """

    KEYS = ("loss", "bpd", "beta", "skipped_steps")

    def __init__(self, verbose=1):
        super().__init__()
        # Keras' live bar writes terminal control and colour codes: lines only into files.
        self.verbose = 2 if verbose == 1 and not sys.stdout.isatty() else verbose
        self._bar = None
        self._seen = 0

    def on_epoch_begin(self, epoch, logs=None):
        epochs = self.params.get("epochs")
        print(f"Epoch {epoch + 1}/{epochs}" if epochs else f"Epoch {epoch + 1}")
        self._bar = keras.utils.Progbar(
            self.params.get("steps"),
            verbose=self.verbose,
            stateful_metrics=self.KEYS + ("val_bpd",),
        )
        self._seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self._seen = batch + 1
        self._update(logs, self.KEYS)

    def on_epoch_end(self, epoch, logs=None):
        self._finish(logs, self.KEYS + ("val_bpd",))

    def on_train_end(self, logs=None):
        self._finish(logs, self.KEYS)  # a run stopped mid-epoch still gets its line

    def _finish(self, logs, keys):
        if self._bar is not None:
            self._update(logs, keys, finalize=True)
            self._bar = None

    def _update(self, logs, keys, finalize=False):
        logs = logs or {}
        values = [(k, logs[k]) for k in keys if k in logs]
        # Progbar prints 0 as 0.0000e+00: the skip counter appears once it is non-zero.
        values = [(k, v) for k, v in values if k != "skipped_steps" or v]
        self._bar.update(self._seen, values, finalize=finalize)
