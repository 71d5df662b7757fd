"""A loss term whose gradient is computed after all the others.

TensorFlow's executor runs an op as soon as its inputs exist. The spectral regularizer's
gradient needs only its singular vectors, so it is computed at the start of the backward pass,
one kernel-sized tensor per conv, and held until the kernels' own gradients arrive at its end:
at the step's memory peak (MNIST's paper config: ~150 MB of ~1.4 GB; CIFAR-10's: ~630 MB of
~4.9 GB). Taken afterwards, it is computed when the activations are already freed.
"""

import tensorflow as tf


def add_deferred(tape, target, grads, variables):
    """``grads`` plus the gradient of ``target`` with respect to ``variables``, computed only
    once every tensor of ``grads`` exists.

    Args:
      tape: a persistent ``tf.GradientTape`` that recorded ``target``.
      target: the deferred term (a scalar).
      grads: the other terms' gradients, one per variable (None where unconnected).
      variables: what both are taken with respect to.
    """
    ready = tf.group(*tf.nest.flatten([g for g in grads if g is not None], expand_composites=True))
    with tf.control_dependencies([ready]):
        extra = tape.gradient(target, variables)
    return [g if e is None else (e if g is None else g + e) for g, e in zip(grads, extra)]
