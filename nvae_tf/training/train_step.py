"""One training step of NVAE, behind ``NVAE.train_step`` (docs/design.md#objective).

Forward pass with kernels weight-normalized by shape, the objective, gradients (the spectral
term's last: training/deferred_gradient.py), the guarded update, metrics. A skipped step leaves
batch-norm statistics, the spectral vectors and the metrics as they were (``StepState``).
"""

import contextlib

import tensorflow as tf

from nvae_tf.inference.likelihood import bits_per_dim
from nvae_tf.layers.normalization import queued_moving_averages
from nvae_tf.layers.weight_norm import normalized_together
from nvae_tf.training.deferred_gradient import add_deferred
from nvae_tf.training.guarded_optimizer import GuardedOptimizer, global_norm, schedule_step
from nvae_tf.training.step_state import StepState


def run_train_step(model, x):
    """Train ``model`` (a compiled ``NVAE``) on the image batch ``x``; returns its logs."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    optimizer, variables = model.optimizer, model.trainable_variables
    state = StepState(model)
    state.snapshot()
    with tf.GradientTape(persistent=True) as tape:
        with _forward_by_shape(model) as moving_averages:
            out = model(x, training=True)
        terms = model.objective(model, out, x, schedule_step(optimizer))
        # Gradients are summed over replicas: each contributes its share of the mean.
        scaled = optimizer.scale_loss(terms.loss_but_spectral / replicas)
        spectral = optimizer.scale_loss(terms.reg_weight * terms.spectral / replicas)
    grads = tape.gradient(scaled, variables)
    grads = add_deferred(tape, spectral, grads, variables)  # not held through the backward pass
    # A non-finite loss must skip the step even if its gradients happen to be finite.
    grads[0] = tf.where(tf.math.is_finite(terms.loss), grads[0], float("nan"))
    scale = tf.cast(optimizer.scale_loss(1.0), tf.float32)
    raw_norm = global_norm(grads)
    if isinstance(optimizer, GuardedOptimizer):
        optimizer.apply(grads, variables, global_norm=raw_norm)
    else:
        optimizer.apply(grads, variables)
    values = {
        **terms._asdict(),
        "grad_norm": raw_norm / scale * replicas,
        "bpd": bits_per_dim(terms.nelbo, model.config.num_output_dims),
    }
    trackers = {tracker.name: tracker for tracker in model.metrics}
    for name, value in values.items():
        if name in trackers:
            trackers[name].update_state(value)
    state.restore_unless(tf.equal(optimizer.consecutive_skips, 0), moving_averages)
    return {
        **{name: tracker.result() for name, tracker in trackers.items()},
        "skipped_steps": optimizer.skipped_steps,
        "consecutive_skips": optimizer.consecutive_skips,
    }


@contextlib.contextmanager
def _forward_by_shape(model):
    """The training forward pass weight-normalizes its kernels by shape and queues its BN
    moving-average updates for ``StepState`` (fewer graph ops); yields the queue. Under
    recompute each layer does its own, inside the recomputed block (an empty queue)."""
    if model.config.recompute != "none":
        yield []
        return
    with normalized_together(model.conv_layers()), queued_moving_averages() as queue:
        yield queue
