"""Keep a skipped training step from changing anything: snapshot, then restore if not finite.

The forward pass updates state outside the optimizer's control: batch-norm moving statistics,
the spectral regularizer's power-iteration vectors and the metric trackers. When the guarded
optimizer skips a non-finite step, those updates (NaN, typically) must not stick, or one bad
batch poisons evaluation, sampling and every later checkpoint. ``StepState`` reads them before
the step and writes the old values back when the step was skipped, with ``tf.where`` (the same
program on every replica and under XLA; the skip decision is already replica-consistent).
In NVAE's training step the BN updates are not applied in the forward pass at all: they are
queued (``normalization.queued_moving_averages``) and applied here, to the snapshot, where the
guard writes anyway. Own code: Keras' BatchNormalization has no switch to make its update
conditional on a later result, and a ``tf.cond`` around the whole step cannot wrap the
optimizer's cross-replica call.
"""

import tensorflow as tf

from nvae_tf.layers.normalization import moving_average_update


class StepState:
    """The non-trainable variables of a model (and its metric trackers) around one step.

    Variables of one shape and dtype are read, selected and written back as one stacked
    tensor: a few ops per group instead of an identity and a select per variable (MNIST paper
    config: ~500 such variables, 800 graph nodes fewer).
    """

    def __init__(self, model):
        variables = list(model.non_trainable_variables) + [
            v for metric in model.metrics for v in metric.variables
        ]
        groups = {}
        for variable in variables:
            key = (tuple(variable.shape), tf.as_dtype(variable.dtype))
            groups.setdefault(key, []).append(variable)
        self.groups = list(groups.values())
        self._saved = None

    def snapshot(self):
        """Read every variable now (call before the forward pass)."""
        self._saved = [_read(group) for group in self.groups]

    def restore_unless(self, applied, moving_averages=()):
        """Write the snapshot back where ``applied`` (scalar bool) is false.

        ``moving_averages``: BN updates the step queued instead of applying them
        (``normalization.queued_moving_averages``); they are applied here, to the snapshot,
        only where ``applied``. A group whose every variable has one, with one momentum, needs
        no second read.
        """
        pending = {id(moving): (batch, momentum) for moving, batch, momentum in moving_averages}
        for group, saved in zip(self.groups, self._saved):
            updates = [pending.pop(id(v), None) for v in group]
            if all(updates) and len({momentum for _, momentum in updates}) == 1:
                batch = tf.stack([b for b, _ in updates])
                after = moving_average_update(saved, batch, updates[0][1])
            else:
                for variable, update in zip(group, updates):
                    if update:
                        variable.assign(
                            moving_average_update(tf.convert_to_tensor(variable), *update)
                        )
                after = _read(group)
            for variable, value in zip(group, tf.unstack(tf.where(applied, after, saved))):
                variable.assign(value)
        if pending:
            raise ValueError("moving averages queued for variables outside the step state")
        self._saved = None


def _read(group):
    """The values of same-shape variables now, stacked."""
    return tf.stack([tf.convert_to_tensor(v) for v in group])
