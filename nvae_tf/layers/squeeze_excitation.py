"""Squeeze-and-excitation gate applied at the end of every residual branch (paper §3.1.1)."""

import keras
from keras import ops

from nvae_tf.layers.weight_norm import torch_uniform


@keras.saving.register_keras_serializable(package="nvae_tf")
class SqueezeExcitation(keras.layers.Layer):
    """Global average pool -> Dense(max(C//16, 4)) -> ReLU -> Dense(C) -> sigmoid gate."""

    def build(self, input_shape):
        channels = int(input_shape[-1])
        hidden = max(channels // 16, 4)
        # PyTorch Linear init (U(+-1/sqrt(fan_in)) for weights and biases) for matching dynamics.
        self.squeeze = keras.layers.Dense(
            hidden,
            activation="relu",
            name="squeeze",
            kernel_initializer=torch_uniform(channels),
            bias_initializer=torch_uniform(channels),
        )
        self.excite = keras.layers.Dense(
            channels,
            activation="sigmoid",
            name="excite",
            kernel_initializer=torch_uniform(hidden),
            bias_initializer=torch_uniform(hidden),
        )
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def call(self, x):
        gate = self.excite(self.squeeze(ops.mean(x, axis=(1, 2))))
        # A reshape, not gate[:, None, None, :]: its gradient is a reshape, not a StridedSliceGrad.
        return x * ops.reshape(gate, (-1, 1, 1, gate.shape[-1]))
