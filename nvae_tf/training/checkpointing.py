"""When and how a training run saves its checkpoints (``CheckpointSaver``), and what a failed
save leaves: the previous checkpoint, nothing partial, and one line saying what happened.

Saves happen every ``every_steps`` global steps, every ``every_seconds`` of wall time (so a
kill -9 costs minutes, not thousands of steps), at epoch ends and at the end of training.
``tf.train.CheckpointManager`` writes the files into ``ckpt-N_temp/`` first, renames them and
only then rewrites its ``checkpoint`` pointer, so a kill during a save leaves the previous
checkpoint as the latest; the next start removes the ``_temp`` folder.
"""

import time

import keras

from nvae_tf.run_dir import remove_partial_saves


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, permissions); one-line message."""


def global_step(model):
    """Training batches consumed so far: applied plus skipped optimizer steps.

    (An optimizer that is not built yet, or not a ``GuardedOptimizer``, has no skip counter.)
    """
    optimizer = model.optimizer
    skipped = getattr(optimizer, "skipped_steps", None)
    return int(optimizer.iterations.numpy()) + (int(skipped.numpy()) if skipped is not None else 0)


class CheckpointSaver(keras.callbacks.Callback):
    """Saves ``manager``'s checkpoint, numbered by the global step, on the schedule above.

    A save waits for the next finite step after a skipped one, so a checkpoint is never taken
    in the middle of a non-finite streak (the state is unchanged by skipped steps, but a
    rollback should land on the last good step). ``every_seconds=None`` saves by steps only
    (multi-worker runs: every worker must take part in each save, and clocks differ).
    """

    def __init__(self, manager, every_steps, every_seconds=None, clock=time.monotonic):
        super().__init__()
        self.manager = manager
        self.every_steps = int(every_steps)
        self.every_seconds = every_seconds
        self._clock = clock
        self._pending = False
        self._saved_step = None
        self._saved_at = None
        self._finite = True

    def on_train_begin(self, logs=None):
        self._saved_step = global_step(self.model)  # the restored (or initial) state
        self._saved_at = self._clock()
        self._pending = False
        self._finite = True

    def on_train_batch_end(self, batch, logs=None):
        self._finite = int((logs or {}).get("consecutive_skips", 0)) == 0
        if global_step(self.model) % self.every_steps == 0:
            self._pending = True
        if self.every_seconds and self._clock() - self._saved_at >= self.every_seconds:
            self._pending = True
        self._save_if_pending()

    def on_epoch_end(self, epoch, logs=None):
        self._pending = True
        self._save_if_pending()

    def on_train_end(self, logs=None):
        self._pending = True
        self._save_if_pending()

    def _save_if_pending(self):
        step = global_step(self.model)
        if self._pending and self._finite and step != self._saved_step:
            save(self.manager, step)
            self._saved_step = step
            self._saved_at = self._clock()
            self._pending = False

    @property
    def saved_step(self):
        """Global step of the newest checkpoint this run holds (restored or saved)."""
        return self._saved_step


def save(manager, step):
    """``manager.save(step)``; on failure remove what it wrote and raise ``CheckpointSaveError``."""
    try:
        return manager.save(checkpoint_number=step)
    except Exception as e:  # OSError or tf.errors.*: disk full, read-only, quota, ...
        directory = manager.directory
        remove_partial_saves(directory)  # the temp folder and any unlisted, broken ckpt-N
        previous = manager.latest_checkpoint
        kept = f"{previous} is kept" if previous else "no earlier checkpoint exists"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointSaveError(
            f"could not save the checkpoint of step {step} in {directory} ({reason}); "
            f"removed the partial save, {kept}"
        ) from None
