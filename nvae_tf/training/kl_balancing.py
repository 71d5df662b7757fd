"""KL balancing (docs/design.md#kl-balancing): reweight per-group KLs during the KL warm-up.

While ``beta < 1`` each group's KL gets a stop-gradient coefficient proportional to its
batch-average KL divided by its size factor ``alpha`` (so that no group is switched off early:
posterior-collapse prevention); afterwards the KL is the plain sum over groups.
"""

import numpy as np
import tensorflow as tf


def balance_coefficients(groups_per_scale):
    """Alpha per latent group, ``(2**i)**2 / G_i`` for scale ``i`` divided by its minimum.

    ``groups_per_scale`` lists the group counts with the TOP (lowest-resolution, i = 0) scale
    first, i.e. in decoder order (the reverse of the original's ``groups_per_scale``, see
    docs/design.md#layout-rules); the result is a float32 numpy array of length
    ``sum(groups_per_scale)`` in the same order as the KL columns.
    """
    alpha = np.concatenate([np.full(g, (2.0**i) ** 2 / g) for i, g in enumerate(groups_per_scale)])
    return (alpha / alpha.min()).astype(np.float32)


def balance_gamma(kl, alpha):
    """Balancing coefficients ``gamma_l`` (L,), no gradient, ``sum_l gamma_l = L``.

    ``gamma_l`` is proportional to ``(mean_b |kl[b, l]| + 0.01) / alpha_l``. The batch mean is
    over the local (per-replica) batch, as in the original, which does not all-reduce it.
    """
    kl = tf.stop_gradient(kl)
    alpha = tf.cast(alpha, kl.dtype)
    gamma = (tf.reduce_mean(tf.abs(kl), axis=0) + 0.01) / alpha
    return gamma / tf.reduce_mean(gamma)


def balanced_kl(kl, beta, alpha=None):
    """Per-image weighted KL (B,) from per-group KLs ``kl`` (B, L) and KL coefficient ``beta``.

    ``beta * sum_l gamma_l * kl[b, l]`` (``gamma`` from ``balance_gamma``, stop-gradient) while
    ``beta < 1``; ``beta * sum_l kl[b, l]`` once ``beta >= 1`` or with ``alpha=None``
    (balancing off). The switch is a ``tf.where`` on ``beta``, so it is graph-safe.
    """
    kl = tf.convert_to_tensor(kl)
    beta = tf.cast(beta, kl.dtype)
    plain = tf.reduce_sum(kl, axis=1)
    if alpha is None:
        return beta * plain
    weighted = tf.reduce_sum(kl * balance_gamma(kl, alpha)[tf.newaxis, :], axis=1)
    return beta * tf.where(beta < 1.0, weighted, plain)
