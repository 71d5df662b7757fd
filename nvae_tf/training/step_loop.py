"""The step loop of ``nvae-train``: Keras fit's callback protocol over a checkpointed iterator.

One pass of ``StepLoop.run`` trains from the restored global step up to ``stop_at``: epochs
begin and end (with held-out evaluation when due) where ``model.fit`` would begin and end
them, every callback sees the same calls, and on top of that
  * the hang watchdog times each data fetch + step (``nvae_tf.training.watchdog``);
  * a streak of ``max_skipped_steps`` non-finite steps rolls back to the newest intact
    checkpoint when rollbacks are allowed (``nvae_tf.training.rollback``), else stops;
  * a failure to read the training data becomes a one-line ``DataError`` naming the file;
  * a SIGINT/SIGTERM stops after the current step (the checkpoint saver then saves it).
"""

import dataclasses
import os

from nvae_tf.training.checkpointing import global_step
from nvae_tf.training.watchdog import HangWatchdog


@dataclasses.dataclass
class StepLoop:
    run: object  # the loop's ``_Run``: strategy, steps per epoch, evaluation, stop flag
    model: object
    iterator: object
    callbacks: object  # the keras CallbackList of every callback
    own_callbacks: list  # the built-in ones (reset after a rollback)
    guard: object  # the SkipGuard
    rollback: object
    manager: object  # the CheckpointManager (its newest checkpoint is named on a hang)

    def run_to(self, stop_at, watchdog=(0, 0)):
        """Train up to global step ``stop_at``; returns the last logs and the last
        ``(step, held-out result)`` evaluated at an epoch end (or None)."""
        import tensorflow as tf

        from nvae_tf.data.errors import data_error_from
        from nvae_tf.training.distribute import distribute_batch, make_train_step
        from nvae_tf.training.held_out import evaluation_due

        run, model, callbacks = self.run, self.model, self.callbacks
        train_step = make_train_step(model, run.strategy)
        step, logs, evaluated, epoch_open = global_step(model), {}, None, False
        model.stop_training = False
        callbacks.on_train_begin()
        factor, min_seconds = watchdog
        with HangWatchdog(factor, min_seconds, describe=self._newest) as dog:
            run.stop.in_loop = True
            while step < stop_at and not model.stop_training:
                epoch, batch = divmod(step, run.steps_per_epoch)
                if not epoch_open:
                    if batch == 0:  # a resumed mid-epoch run keeps its restored epoch averages
                        model.reset_metrics()
                    callbacks.on_epoch_begin(epoch)
                    epoch_open = True
                callbacks.on_train_batch_begin(batch)
                dog.start_step()
                try:
                    images = next(self.iterator)
                except (tf.errors.OpError, ValueError) as e:
                    raise data_error_from(e, run.config) from None
                logs = train_step(distribute_batch(run.strategy, images))
                logs = {k: v.numpy().item() for k, v in logs.items()}
                dog.end_step()
                callbacks.on_train_batch_end(batch, logs)  # saves, logs: not timed
                step = global_step(model)
                if self.guard.message and self.rollback.possible(model):
                    step = self._roll_back()
                    epoch_open = False
                    continue
                if run.stop.signal:
                    model.stop_training = True
                if step % run.steps_per_epoch == 0:
                    epoch_logs = dict(logs)
                    if not model.stop_training and evaluation_due(epoch, run.config.epochs):
                        test = run.evaluate(model)
                        evaluated = (step, test)
                        epoch_logs.update({"val_nelbo": test["nelbo"], "val_bpd": test["bpd"]})
                    callbacks.on_epoch_end(epoch, epoch_logs)
                    epoch_open = False
            callbacks.on_train_end(logs)
            run.stop.in_loop = False
        return logs, evaluated

    def _roll_back(self):
        from nvae_tf.training.callbacks import CSVMetrics

        step = self.rollback.apply(self.model)
        if self.run.chief:
            CSVMetrics.truncate_after(self.run.metrics_path, step)
        self.model.stop_training = False
        for callback in self.own_callbacks:  # the guard, saver and loggers restart at `step`
            callback.on_train_begin()
        return step

    def _newest(self):
        newest = self.manager.latest_checkpoint
        return f"the newest checkpoint is {os.path.basename(newest)}" if newest else ""
