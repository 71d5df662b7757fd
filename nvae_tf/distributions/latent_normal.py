"""Soft-clamped diagonal Normal of every NVAE latent group (docs/design.md#latent-distributions).

The network predicts raw `mu` and `log_sigma`; both are squashed with 5*tanh(x/5) and the
scale gets a +0.01 floor. The result is a plain `tfp.distributions.Normal`, so its analytic
KL, log-density and reparameterized sampling come from TFP.
"""

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

_CLAMP_BOUND = 5.0
_SIGMA_FLOOR = 0.01


def soft_clamp(x):
    """Smoothly squash `x` into (-5, 5): 5 * tanh(x / 5)."""
    return _CLAMP_BOUND * tf.tanh(x / _CLAMP_BOUND)


def latent_normal(mu, log_sigma, temperature=1.0):
    """Normal(5tanh(mu/5), (exp(5tanh(log_sigma/5)) + 0.01) * temperature), in float32.

    Inputs are cast to float32 first, so float16/bfloat16 network outputs are fine.
    """
    mu = soft_clamp(tf.cast(mu, tf.float32))
    log_sigma = soft_clamp(tf.cast(log_sigma, tf.float32))
    sigma = (tf.exp(log_sigma) + _SIGMA_FLOOR) * tf.cast(temperature, tf.float32)
    return tfd.Normal(loc=mu, scale=sigma)


def residual_normal(prior_mu, prior_log_sigma, delta_mu, delta_log_sigma):
    """Residual posterior: the raw (pre-clamp) prior and encoder outputs are summed first,
    then clamped, as in the original (paper §3.2; docs/design.md#original-quirks-we-keep)."""
    mu = tf.cast(prior_mu, tf.float32) + tf.cast(delta_mu, tf.float32)
    log_sigma = tf.cast(prior_log_sigma, tf.float32) + tf.cast(delta_log_sigma, tf.float32)
    return latent_normal(mu, log_sigma)


def top_prior(shape, temperature=1.0):
    """Prior of the top latent group: latent_normal(0, 0), i.e. Normal(0, 1.01 * temperature)."""
    zeros = tf.zeros(shape, tf.float32)
    return latent_normal(zeros, zeros, temperature)
