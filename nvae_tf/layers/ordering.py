"""When a graph computes something: not before it is needed, for memory.

TensorFlow's executor runs an op as soon as its inputs exist. Whatever is computed from
tensors that exist early but used late is held all along, e.g. what a hand-written gradient
recomputes from forward tensors (MNIST's paper config: ~430 MB at the training step's peak).
(``recompute`` uses a data dependency instead: XLA drops control dependencies.)
"""

import tensorflow as tf


def after(x, upstream):
    """``x``, available only once ``upstream`` exists (a control dependency)."""
    with tf.control_dependencies([upstream]):
        return tf.identity(x)
