"""Importance-weighted log-likelihood and ELBO per image, in nats (spec 3.6, 6).

``log p(x) ~= logsumexp_k(log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log K`` over K posterior
samples. The K samples are drawn in chunks (the batch tiled ``chunk`` times per forward pass) so
that K = 1000 fits in memory; batch norm runs in inference mode, so tiling changes nothing.
"""
import math

import tensorflow as tf


def importance_weighted(model, x, num_samples, max_images_per_pass=256):
    """Returns ``(log_likelihood, elbo)``, each (B,) in nats, from ``num_samples`` samples.

    ``elbo`` is the average over the K samples of ``log p(x|z) - sum_l KL_l`` (the bound the
    model trains on, analytic KL where the model uses it).
    """
    x = model.check_images(x)
    batch = tf.shape(x)[0]
    k_total = tf.cast(num_samples, tf.int32)
    tf.debugging.assert_positive(k_total, message="num_samples must be positive")
    chunk = tf.clip_by_value(max_images_per_pass // tf.maximum(batch, 1), 1, k_total)
    num_chunks = (k_total + chunk - 1) // chunk

    def body(i, chunk_lse, elbo_sum):
        tiled = tf.tile(x, [chunk, 1, 1, 1])
        out = model(tiled, training=False)
        log_px = out["decoder"].log_prob(tiled)
        log_w = tf.reshape(log_px + out["log_p"] - out["log_q"], [chunk, batch])
        elbo = tf.reshape(log_px - tf.reduce_sum(out["kl"], axis=1), [chunk, batch])
        valid = (i * chunk + tf.range(chunk)) < k_total  # the last chunk may overshoot K
        log_w = tf.where(valid[:, None], log_w, -math.inf)
        elbo = tf.where(valid[:, None], elbo, 0.0)
        return (i + 1, chunk_lse.write(i, tf.reduce_logsumexp(log_w, axis=0)),
                elbo_sum + tf.reduce_sum(elbo, axis=0))

    _, chunk_lse, elbo_sum = tf.while_loop(
        lambda i, *_: i < num_chunks, body,
        (tf.constant(0), tf.TensorArray(tf.float32, size=num_chunks), tf.zeros([batch])))
    k = tf.cast(k_total, tf.float32)
    log_likelihood = tf.reduce_logsumexp(chunk_lse.stack(), axis=0) - tf.math.log(k)
    return log_likelihood, elbo_sum / k


def bits_per_dim(nats, num_dims):
    """Convert a per-image value in nats to bits per dimension: nats / (ln 2 * D)."""
    return nats / (math.log(2.0) * num_dims)
