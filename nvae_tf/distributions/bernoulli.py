"""Bernoulli image likelihood for binarized MNIST/OMNIGLOT, scored on the central crop.

The model works at 32x32 (28x28 digits padded by 2); only the central 28x28 Bernoulli
log-probs count, so that bpd uses D = 784 (docs/design.md#output-distributions).
"""

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


class CroppedBernoulli(tfd.Distribution):
    """Independent Bernoulli pixels whose log-prob is summed over `[crop:-crop, crop:-crop]`.

    `logits`: (B, H, W, C). batch_shape (B,), event_shape (H, W, C); `log_prob(x)` -> (B,);
    `sample()` gives full-size {0, 1} float32 images; `mean()` = sigmoid(logits).
    """

    def __init__(self, logits, crop=2, validate_args=False, name="CroppedBernoulli"):
        parameters = dict(locals())
        if int(crop) != crop or crop < 0:
            raise ValueError(f"crop must be a non-negative integer, got {crop}.")
        with tf.name_scope(name) as name:
            self._logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
            self._crop = int(crop)
            super().__init__(
                dtype=tf.float32,
                reparameterization_type=tfd.NOT_REPARAMETERIZED,
                validate_args=validate_args,
                allow_nan_stats=True,
                parameters=parameters,
                name=name,
            )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict(logits=tfp.util.ParameterProperties(event_ndims=3))

    @property
    def logits(self):
        return self._logits

    @property
    def crop(self):
        return self._crop

    def _pixels(self):
        return tfd.Bernoulli(
            logits=self._logits, dtype=tf.float32, validate_args=self.validate_args
        )

    def _event_shape(self):
        return self._logits.shape[-3:]

    def _event_shape_tensor(self):
        return tf.shape(self._logits)[-3:]

    def _log_prob(self, x):
        log_probs = self._pixels().log_prob(x)  # (..., H, W, C)
        c = self._crop
        shape = tf.shape(log_probs)
        h = log_probs.shape[-3] if log_probs.shape[-3] is not None else shape[-3]
        w = log_probs.shape[-2] if log_probs.shape[-2] is not None else shape[-2]
        log_probs = log_probs[..., c : h - c, c : w - c, :]
        return tf.reduce_sum(log_probs, axis=[-3, -2, -1])

    def _sample_n(self, n, seed=None):
        return self._pixels().sample(n, seed=seed)

    def _mean(self):
        return tf.sigmoid(self._logits)
