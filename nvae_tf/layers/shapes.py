"""Static shapes where they are known, so that traced graphs carry no shape ops for them."""

import tensorflow as tf


def known_shape(x):
    """``x``'s shape as a list: Python ints where static, scalars of one ``tf.shape`` elsewhere.

    ``keras.ops.shape`` gives the same values but always adds a ``Shape`` op to the graph; the
    training step calls this a few hundred times, so the fully static case adds none here.
    """
    shape = x.shape.as_list()
    if None not in shape:
        return shape
    dynamic = tf.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(shape)]
