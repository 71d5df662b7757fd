"""Importance-weighted log-likelihood and ELBO per image, in nats (docs/design.md#evaluation).

``log p(x) ~= logsumexp_k(log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log K`` over K posterior
samples. The K samples are drawn in chunks (the batch tiled ``chunk`` times per forward pass) so
that K = 1000 fits in memory; batch norm runs in inference mode, so tiling changes nothing, and
the encoder runs once per image: its features are tiled, not recomputed per sample.

The estimator itself (``iw_estimate``) only sees a callable that returns log-weights and ELBO
terms for a number of samples, so any latent-variable model with a known marginal likelihood
can be pushed through the very same code (tests/test_evaluation.py uses a linear-Gaussian one).
"""

import math

import numpy as np
import tensorflow as tf


def iw_estimate(sample_fn, num_samples, samples_per_pass, seed):
    """Importance-weighted estimate from ``num_samples`` samples drawn in chunks.

    ``sample_fn(n, seed)`` returns ``(log_w, elbo)``, each (n, B): ``n`` posterior samples per
    image with ``log_w = log p(x, z) - log q(z | x)`` and ``elbo`` that sample's ELBO term.
    Chunks of at most ``samples_per_pass`` samples, as equal as possible, use seeds folded from
    the stateless ``seed``; the last chunk may overshoot K and its surplus is masked out.
    Returns ``(log_likelihood, elbo)``, each (B,): ``logsumexp_k(log_w) - log K`` and the mean
    ELBO over the K samples.
    """
    k_total = tf.cast(num_samples, tf.int32)
    tf.debugging.assert_positive(k_total, message="num_samples must be positive")
    chunk = tf.clip_by_value(tf.cast(samples_per_pass, tf.int32), 1, k_total)
    num_chunks = (k_total + chunk - 1) // chunk
    chunk = (k_total + num_chunks - 1) // num_chunks  # balanced: K=100 by 64 is 2 x 50, not 2 x 64

    def body(i, chunk_lse, chunk_elbo):
        log_w, elbo = sample_fn(chunk, tf.random.experimental.stateless_fold_in(seed, i))
        valid = (i * chunk + tf.range(chunk)) < k_total  # the last chunk may overshoot K
        log_w = tf.where(valid[:, None], log_w, -math.inf)
        elbo = tf.where(valid[:, None], elbo, 0.0)
        return (
            i + 1,
            chunk_lse.write(i, tf.reduce_logsumexp(log_w, axis=0)),
            chunk_elbo.write(i, tf.reduce_sum(elbo, axis=0)),
        )

    _, chunk_lse, chunk_elbo = tf.while_loop(
        lambda i, *_: i < num_chunks,
        body,
        (
            tf.constant(0),
            tf.TensorArray(tf.float32, size=num_chunks),
            tf.TensorArray(tf.float32, size=num_chunks),
        ),
        parallel_iterations=1,  # one chunk in memory at a time: the point of chunking
    )
    k = tf.cast(k_total, tf.float32)
    log_likelihood = tf.reduce_logsumexp(chunk_lse.stack(), axis=0) - tf.math.log(k)
    return log_likelihood, tf.reduce_sum(chunk_elbo.stack(), axis=0) / k


def importance_weighted(
    model, x: tf.Tensor, num_samples: int, max_images_per_pass: int = 256, seed=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns ``(log_likelihood, elbo)``, each (B,) in nats, from ``num_samples`` samples.

    ``elbo`` is the average over the K samples of ``log p(x|z) - sum_l KL_l`` (the bound the
    model trains on, analytic KL where the model uses it). Each pass tiles the batch up to
    ``max_images_per_pass`` images. ``seed`` (stateless, shape (2,)) makes the result
    reproducible; by default it comes from the model's generator.
    """
    x = model.check_images(x)
    batch = tf.shape(x)[0]
    seed = model.stateless_seed(seed)
    # The encoder is deterministic at inference: one pass serves all K samples.
    features = model.bottom_up(x, training=False)

    def sample_fn(n, chunk_seed):
        tiled = tf.tile(x, [n, 1, 1, 1])
        out = model.top_down(
            [tf.tile(f, [n, 1, 1, 1]) for f in features],
            training=False,
            seed=tf.cast(chunk_seed, tf.int64),
        )
        log_w = tf.reshape(out.log_weight(tiled), [n, batch])
        elbo = tf.reshape(-out.negative_elbo(tiled), [n, batch])
        return log_w, elbo

    return iw_estimate(sample_fn, num_samples, max_images_per_pass // tf.maximum(batch, 1), seed)


def mean_and_standard_error(values) -> tuple[float, float]:
    """Mean of per-image ``values`` and its standard error ``std / sqrt(N)`` (N-1 in the std)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def bits_per_dim(nats, num_dims: int):
    """Convert a per-image value in nats to bits per dimension: nats / (ln 2 * D)."""
    return nats / (math.log(2.0) * num_dims)
