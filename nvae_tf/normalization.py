"""Batch normalization as NVAE uses it (spec 2.8) and the fused-in-spirit BN + Swish.

Momentum 0.95 / epsilon 1e-5 (PyTorch momentum 0.05, eps 1e-5), statistics synchronized across
replicas. ``update_stats=False`` normalizes with batch statistics without touching the moving
averages: the recompute pass of ``nvae_tf.recompute`` needs it, since a second update per step
would change the statistics (``tf.recompute_grad`` has no such switch).
"""
import keras
from keras import ops

BN_MOMENTUM = 0.95
BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="nvae_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras BatchNormalization with NVAE's constants and an ``update_stats`` switch."""

    def __init__(self, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=True, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, synchronized=synchronized, **kwargs)

    def call(self, inputs, training=None, update_stats=True):
        if not training or update_stats or not self.trainable:
            return super().call(inputs, training=training)
        x = ops.cast(inputs, "float32")
        mean, variance = self._moments(x, None)
        out = ops.batch_normalization(x, mean, variance, axis=self.axis,
                                      offset=ops.cast(self.beta, x.dtype),
                                      scale=ops.cast(self.gamma, x.dtype), epsilon=self.epsilon)
        return ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="nvae_tf")
class BNSwish(keras.layers.Layer):
    """BatchNorm followed by Swish (x * sigmoid(x))."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = BatchNorm(name="bn")

    def build(self, input_shape):
        self.bn.build(input_shape)

    def call(self, x, training=None, update_stats=True):
        return keras.activations.silu(self.bn(x, training=training, update_stats=update_stats))
