"""Discretized logistic mixture likelihood for RGB images (paper App. A "Image Decoder").

PixelCNN++-style decoder: per pixel, M logistic components share one set of mixture weights
across R, G, B; the G and B locations depend linearly on the observed R (and G) values.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

_LOG_SCALE_MIN = -7.0
_LOWER_EDGE = -0.999
_UPPER_EDGE = 0.999
_ORIGINAL_UPPER_EDGE = 0.99  # the original's threshold; also catches value 254 at 8 bits
_MIN_BIN_MASS = 1e-5
_UNIFORM_EPS = 1e-5  # the original draws its uniforms from (1e-5, 1 - 1e-5)


def _couple_rgb(x, coeffs):
    """Sequential RGB autoregression with clamping to [-1, 1].

    x: (..., 3) channel values before coupling; coeffs: (..., 3) = (R->G, R->B, G->B).
    """
    r = tf.clip_by_value(x[..., 0], -1.0, 1.0)
    g = tf.clip_by_value(x[..., 1] + coeffs[..., 0] * r, -1.0, 1.0)
    b = tf.clip_by_value(x[..., 2] + coeffs[..., 1] * r + coeffs[..., 2] * g, -1.0, 1.0)
    return tf.stack([r, g, b], axis=-1)


class DiscretizedLogisticMixture(tfd.Distribution):
    """Mixture of discretized logistics over `num_bits`-bit RGB pixels.

    `params` is the decoder's raw NHWC output (B, H, W, 10M), laid out like the original's
    channels: [0:M] mixture logits shared by R, G, B; [M:10M] viewed as (3 colour channels, 3M),
    each colour block holding M means, M log-scales and M raw coefficients. For the
    coefficient "colour" index 0, 1, 2 these are the R->G, R->B and G->B couplings.
    Values (images) live in [0, 1]; batch_shape is (B, H, W), event_shape (3,). `log_prob`
    evaluates the bin nearest to each value (inputs are on the 2^num_bits grid after
    pre-processing, docs/design.md#data).

    `original_edge=True` uses the original's upper-edge threshold 0.99 (at 8 bits value 254 then
    also gets the upper-tail mass and the pmf no longer sums to 1); the default 0.999 gives a
    normalised likelihood. `original_temperature=True` divides the logistic noise scale by the
    temperature in `sample()` as the original does; the default multiplies. Why: see
    docs/design.md#dml-top-edge and docs/design.md#mixture-temperature.
    """

    def __init__(
        self,
        params,
        num_bits=8,
        temperature=1.0,
        original_edge=False,
        original_temperature=False,
        validate_args=False,
        name="DiscretizedLogisticMixture",
    ):
        parameters = dict(locals())
        if not 1 < int(num_bits) <= 8:
            raise ValueError(f"num_bits must be in (1, 8], got {num_bits}.")
        with tf.name_scope(name) as name:
            self._params = tf.cast(tf.convert_to_tensor(params), tf.float32)
            channels = self._params.shape[-1]
            if channels is None or channels % 10 != 0:
                raise ValueError(
                    f"params needs a static last dimension of 10 * num_mixtures, got {channels}."
                )
            self._num_mixtures = channels // 10
            self._num_bits = int(num_bits)
            self._temperature = tf.cast(tf.convert_to_tensor(temperature), tf.float32)
            self._original_edge = bool(original_edge)
            self._original_temperature = bool(original_temperature)
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
        return dict(
            params=tfp.util.ParameterProperties(event_ndims=1),
            temperature=tfp.util.ParameterProperties(
                event_ndims=0,
                default_constraining_bijector_fn=lambda: tfb.Softplus(low=np.float32(1e-6)),
            ),
        )

    @property
    def params(self):
        return self._params

    @property
    def num_mixtures(self):
        return self._num_mixtures

    @property
    def num_bits(self):
        return self._num_bits

    @property
    def temperature(self):
        return self._temperature

    def _event_shape(self):
        return tf.TensorShape([3])

    def _event_shape_tensor(self):
        return tf.constant([3], dtype=tf.int32)

    def _components(self):
        """Split params into logits (..., M) and means, log_scales, coeffs (..., 3, M).

        Splits rather than slices: the gradient of a split is one concat, that of each slice a
        params-sized zero tensor summed with the others (~4% of a CIFAR-10 training step).
        """
        m = self._num_mixtures
        logits, rest = tf.split(self._params, [m, 9 * m], axis=-1)
        rest = tf.reshape(rest, tf.concat([tf.shape(rest)[:-1], [3, 3 * m]], axis=0))
        means, log_scales, coeffs = tf.split(rest, 3, axis=-1)
        return logits, means, tf.maximum(log_scales, _LOG_SCALE_MIN), tf.tanh(coeffs)

    def _log_prob(self, x):
        logits, means, log_scales, coeffs = self._components()
        max_val = 2.0**self._num_bits - 1.0
        # Snap to the bin index k (pre-processed data lie on the grid) and build the bin edges
        # (2k -+ 1) / max_val - 1 from k, so neighbouring bins share bit-identical edges and the
        # pmf sums to 1 in float32 even for the narrowest logistics. x = 2k / max_val - 1.
        k = tf.round(tf.cast(x, tf.float32) * max_val)  # (..., 3)
        x = 2.0 * k / max_val - 1.0
        r, g = x[..., 0:1], x[..., 1:2]  # (..., 1), broadcast over mixtures
        r_to_g, r_to_b, g_to_b = tf.unstack(coeffs, axis=-2)  # (..., M) each
        shift_g = r_to_g * r
        shift_b = r_to_b * r + g_to_b * g
        means = means + tf.stack(
            [tf.zeros_like(shift_g), shift_g, shift_b], axis=-2
        )  # observed R, G
        x = x[..., tf.newaxis]  # (..., 3, 1)
        k = k[..., tf.newaxis]
        inv_scale = tf.exp(-log_scales)
        plus_in = inv_scale * ((2.0 * k + 1.0) / max_val - 1.0 - means)  # (x + half - mean) / s
        min_in = inv_scale * ((2.0 * k - 1.0) / max_val - 1.0 - means)  # (x - half - mean) / s
        mid_in = inv_scale * (x - means)
        log_cdf_plus = -tf.nn.softplus(-plus_in)  # lowest value: log CDF(x + half)
        log_one_minus_cdf_min = -tf.nn.softplus(min_in)  # highest value: log(1 - CDF(x - half))
        # log(CDF(x + half) - CDF(x - half)) as log s(a) + log s(-b) + log(1 - exp(b - a)): no
        # cancellation between two sigmoids near 1; a - b is an exact float subtraction.
        log_cdf_delta = (
            log_cdf_plus
            + log_one_minus_cdf_min
            + tf.math.log(tf.maximum(-tf.math.expm1(min_in - plus_in), 1e-30))
        )
        log_pdf_mid = mid_in - log_scales - 2.0 * tf.nn.softplus(mid_in)
        log_prob_mid = tf.where(
            log_cdf_delta > np.log(_MIN_BIN_MASS),
            log_cdf_delta,
            log_pdf_mid - np.log(max_val / 2.0),
        )
        upper = _ORIGINAL_UPPER_EDGE if self._original_edge else _UPPER_EDGE
        log_probs = tf.where(
            x < _LOWER_EDGE, log_cdf_plus, tf.where(x > upper, log_one_minus_cdf_min, log_prob_mid)
        )
        log_probs = tf.reduce_sum(log_probs, axis=-2) + tf.nn.log_softmax(logits, axis=-1)
        return tf.reduce_logsumexp(log_probs, axis=-1)

    def _sample_n(self, n, seed=None):
        if isinstance(seed, tf.Tensor) and seed.dtype == tf.int64:
            # The model's stateless seeds are int64 (stateless_fold_in); TFP's take int32.
            seed = tf.cast(seed, tf.int32)
        mixture_seed, noise_seed = tfp.random.split_seed(seed, n=2, salt="DiscLogisticMixture")
        logits, means, log_scales, coeffs = self._components()
        t = self._temperature
        shape = tf.concat([[n], tf.shape(logits)], axis=0)  # (n, ..., M)
        u = tf.random.stateless_uniform(
            shape, seed=mixture_seed, minval=_UNIFORM_EPS, maxval=1.0 - _UNIFORM_EPS
        )
        gumbel = -tf.math.log(-tf.math.log(u))
        choice = tf.one_hot(tf.argmax(logits / t + gumbel, axis=-1), self._num_mixtures)
        choice = choice[..., tf.newaxis, :]  # (n, ..., 1, M)
        means = tf.reduce_sum(means * choice, axis=-1)  # (n, ..., 3)
        log_scales = tf.reduce_sum(log_scales * choice, axis=-1)
        coeffs = tf.reduce_sum(coeffs * choice, axis=-1)
        u = tf.random.stateless_uniform(
            tf.shape(means), seed=noise_seed, minval=_UNIFORM_EPS, maxval=1.0 - _UNIFORM_EPS
        )
        scale = tf.exp(log_scales)
        scale = scale / t if self._original_temperature else scale * t
        x = means + scale * (tf.math.log(u) - tf.math.log1p(-u))
        return _couple_rgb(x, coeffs) / 2.0 + 0.5

    def _mean(self):
        logits, means, _, coeffs = self._components()
        weights = tf.nn.softmax(logits, axis=-1)[..., tf.newaxis, :]  # (..., 1, M)
        means = tf.reduce_sum(means * weights, axis=-1)  # (..., 3)
        coeffs = tf.reduce_sum(coeffs * weights, axis=-1)
        return _couple_rgb(means, coeffs) / 2.0 + 0.5

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args or not is_init:
            return []
        return [
            tf.debugging.assert_positive(self._temperature, message="temperature must be positive.")
        ]

    def _sample_control_dependencies(self, x):
        if not self.validate_args:
            return []
        return [
            tf.debugging.assert_greater_equal(x, 0.0, message="pixels must be in [0, 1]."),
            tf.debugging.assert_less_equal(x, 1.0, message="pixels must be in [0, 1]."),
        ]
