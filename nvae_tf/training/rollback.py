"""Roll a stuck run back to its newest intact checkpoint with a lower learning rate.

When ``max_skipped_steps`` steps in a row were non-finite, training used to stop. With
``max_rollbacks > 0`` it instead restores the newest intact checkpoint (weights, optimizer,
metrics, data position), multiplies the learning rate by ``factor`` (the optimizer's
checkpointed ``learning_rate_scale``, so it stays lowered after a resume) and continues, at most
``max_rollbacks`` times per run (counted in the optimizer's ``rollbacks``). Each rollback is
logged in one line.
"""

import os
import sys

from nvae_tf.run_dir import intact_checkpoint
from nvae_tf.training.checkpointing import global_step

ROLLBACK_FACTOR = 0.5


class Rollback:
    """``possible(model)`` tells whether a rollback is allowed now; ``apply(model)`` does it."""

    def __init__(self, checkpoint, directory, max_rollbacks=0, factor=ROLLBACK_FACTOR):
        self.checkpoint = checkpoint  # the run's tf.train.Checkpoint (model, optimizer, ...)
        self.directory = directory
        self.max_rollbacks = int(max_rollbacks)
        self.factor = float(factor)

    def possible(self, model):
        optimizer = model.optimizer
        return (
            int(optimizer.rollbacks.numpy()) < self.max_rollbacks
            and intact_checkpoint(self.directory) is not None
        )

    def apply(self, model):
        """Restore the newest intact checkpoint, lower the rate; returns its global step."""
        optimizer = model.optimizer
        stuck_at = global_step(model)
        scale = float(optimizer.learning_rate_scale.numpy()) * self.factor
        count = int(optimizer.rollbacks.numpy()) + 1
        path = intact_checkpoint(self.directory)
        self.checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
        optimizer.learning_rate_scale.assign(scale)
        optimizer.rollbacks.assign(count)
        optimizer.consecutive_skips.assign(0)
        step = global_step(model)
        print(
            f"step {stuck_at}: {model.config.max_skipped_steps} consecutive non-finite steps; "
            f"rolled back to {os.path.basename(path)} (step {step}) with the learning rate "
            f"x{scale:g} (rollback {count} of {self.max_rollbacks})",
            file=sys.stderr,
        )
        return step
