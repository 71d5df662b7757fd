"""Where the two towers meet (paper §2, Fig. 2; docs/design.md#latent-groups)."""

import keras
import tensorflow as tf

from nvae_tf.layers.weight_norm import Conv2D


@keras.saving.register_keras_serializable(package="nvae_tf")
class EncoderCombiner(keras.layers.Layer):
    """Bottom-up feature + 1x1 conv of the top-down decoder state (no activation)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.conv = Conv2D(self.filters, 1, name="conv")

    def build(self, encoder_feature_shape, decoder_state_shape):
        self.conv.build(decoder_state_shape)

    def call(self, encoder_feature, decoder_state):
        return encoder_feature + self.conv(decoder_state)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="nvae_tf")
class DecoderCombiner(keras.layers.Layer):
    """Concatenate decoder state and latent sample, then a 1x1 conv back to the state width.

    This is the only way z enters the decoder.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.conv = Conv2D(self.filters, 1, name="conv")

    def build(self, decoder_state_shape, z_shape):
        self.conv.build((*decoder_state_shape[:-1], decoder_state_shape[-1] + z_shape[-1]))

    def call(self, decoder_state, z):
        return self.conv(tf.concat([decoder_state, tf.cast(z, decoder_state.dtype)], axis=-1))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}
