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
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                recomputed = run_cells(cells, inputs, training=training, update_stats=False)
            grads = tape.gradient(recomputed, [inputs] + variables, output_gradients=upstream,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads[0], grads[1:]

        return outputs, backward

    return forward(x)
