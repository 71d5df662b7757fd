"""Gradient checkpointing for cell stacks: keep only the input, recompute in the backward pass.

Built on ``tf.custom_gradient`` rather than ``tf.recompute_grad`` because the recompute pass
must run batch norm on batch statistics WITHOUT updating the moving averages a second time
(``tf.recompute_grad`` calls the function identically twice).
"""

import tensorflow as tf


def run_cells(cells, x, training=None, update_stats=True):
    """Apply ``cells`` in order (each takes ``training`` and ``update_stats``)."""
    for cell in cells:
        x = cell(x, training=training, update_stats=update_stats)
    return x


def recompute_cells(cells, x, training=None):
    """Same value as ``run_cells``; intermediate activations are recomputed for gradients."""

    @tf.custom_gradient
    def forward(inputs):
        outputs = run_cells(cells, inputs, training=training)

        def backward(upstream, variables=None):
            variables = list(variables or [])
            # In a graph, ops run as soon as their inputs exist: without this data dependency
            # the recompute would run during the forward pass and save no memory.
            again = inputs + tf.cast(_zero_after(upstream), inputs.dtype)
            with tf.GradientTape() as tape:
                tape.watch(again)
                recomputed = run_cells(cells, again, training=training, update_stats=False)
            grads = tape.gradient(
                recomputed,
                [again] + variables,
                output_gradients=upstream,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            return grads[0], grads[1:]

        return outputs, backward

    return forward(x)


def _zero_after(tensor):
    """A scalar 0.0 computed from one element of ``tensor`` (a data, not control, dependency:
    XLA drops control dependencies). Grappler cannot fold it: the comparison is on data."""
    first = tf.reshape(tensor, [-1])[:1]
    flag = tf.cast(tf.reduce_max(first), tf.bool)
    return tf.where(tf.equal(flag, flag), 0.0, float("nan"))
