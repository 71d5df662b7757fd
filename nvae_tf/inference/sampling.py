"""Pictures from a trained NVAE: prior samples, reconstructions, fixed-top-scale grids.

Latent ``temperature`` scales every group's prior sigma, the top prior's 1.01 included (paper
§4.2, docs/design.md#sampling). ``decoder_temperature`` scales the logistic noise of the colour
decoder by T (the original divides by T: docs/design.md#mixture-temperature). Pixels are
Bernoulli means for binary data and, for colour images, decoder samples or, with ``mean=True``,
the mixture mean; as in the original's sampling code.
"""

import numpy as np
import tensorflow as tf

from nvae_tf import graph_optimization
from nvae_tf.distributions import CroppedBernoulli


class NonFiniteSamplesError(ValueError):
    """Generated images (or re-adjusted BN statistics) contain NaN or Inf (original issue #36)."""


def decoder_images(decoder, mean=False, seed=None):
    """Images in [0, 1] from p(x | z): Bernoulli means, mixture means or mixture samples."""
    if mean or isinstance(decoder, CroppedBernoulli):
        return decoder.mean()
    return decoder.sample(seed=seed)


def fold_seed(seed, index):
    """An independent stateless seed for ``index`` (a latent group, -1 for the output, ...)."""
    return tf.random.experimental.stateless_fold_in(seed, index)


def _fold(seed, index):
    return tf.cast(fold_seed(seed, index), tf.int64)


def generate(model, num_samples, temperature=1.0, decoder_temperature=1.0, mean=False, seed=None):
    """``num_samples`` images from the prior, (N, H, W, C) in [0, 1].

    With ``mean=False`` this equals ``model.sample(...)`` for the same seed.
    """
    _check_temperatures(temperature, decoder_temperature)
    images = prior_images(
        model, num_samples, temperature, decoder_temperature, mean=mean, seed=seed
    )
    return check_finite(images, "samples")


def prior_images(
    model,
    num_samples,
    temperature=1.0,
    decoder_temperature=1.0,
    mean=False,
    training=False,
    seed=None,
):
    """``num_samples`` images from the prior, in one compiled graph (``model.sample``'s body).

    Temperatures become tensors so that new values reuse the graph; a new ``num_samples``,
    ``mean`` or ``training`` traces a new one.
    """
    draw = _prior_images_xla if model.config.jit_compile else _prior_images
    return draw(
        model,
        num_samples,
        tf.cast(temperature, tf.float32),
        tf.cast(decoder_temperature, tf.float32),
        bool(mean),
        bool(training),
        model.stateless_seed(seed),
    )


def _prior_images_graph(model, num_samples, temperature, decoder_temperature, mean, training, seed):
    decoder = model.prior_output_distribution(
        num_samples, temperature, decoder_temperature, training, seed=seed
    )
    return decoder_images(decoder, mean, _fold(seed, -1))


_prior_images = graph_optimization.function(_prior_images_graph, reduce_retracing=True)
# ``config.jit_compile``: one XLA program per sampling call. On GPUs it fuses the thousands of
# small ops that otherwise each cost a kernel launch.
_prior_images_xla = graph_optimization.function(
    _prior_images_graph, reduce_retracing=True, jit_compile=True
)


def reconstruct(model, images, decoder_temperature=1.0, mean=False, seed=None):
    """Decode one posterior sample of each image; equals ``model.reconstruct`` by default."""
    _check_temperatures(1.0, decoder_temperature)
    seed = model.stateless_seed(seed)
    logits = model(images, training=False, seed=seed).logits
    decoder = model.output_distribution(logits, decoder_temperature)
    return check_finite(decoder_images(decoder, mean, _fold(seed, -1)), "reconstructions")


def num_groups_in_top_scales(config, num_scales):
    """Latent groups in the ``num_scales`` lowest-resolution scales."""
    if not 0 <= num_scales <= config.num_latent_scales:
        raise ValueError(
            f"the number of fixed scales must be between 0 and "
            f"{config.num_latent_scales} for this model, got {num_scales}"
        )
    return sum(config.groups_per_scale[:num_scales])


def fixed_top_grid(
    model,
    num_rows,
    num_columns,
    num_fixed_scales,
    temperature=1.0,
    decoder_temperature=1.0,
    mean=False,
    seed=0,
):
    """Paper Fig. 12: each row keeps the z of the top ``num_fixed_scales`` scales, the
    remaining groups are resampled in every column. Returns (rows, columns, H, W, C).
    """
    _check_temperatures(temperature, decoder_temperature)
    fixed = num_groups_in_top_scales(model.config, num_fixed_scales)
    seed = model.stateless_seed(seed)
    fixed_seed = _fold(seed, -2)

    @graph_optimization.function
    def column(column_seed):
        decoder = model.prior_output_distribution(
            num_rows,
            temperature,
            decoder_temperature,
            seed=column_seed,
            num_fixed_groups=fixed,
            fixed_seed=fixed_seed,
        )
        return decoder_images(decoder, mean, _fold(column_seed, -1))

    columns = [column(_fold(seed, c)) for c in range(num_columns)]
    return check_finite(tf.stack(columns, axis=1), "samples")


def check_finite(images, what):
    """Return ``images`` as a numpy array; raise NonFiniteSamplesError if any is NaN or Inf."""
    images = np.asarray(images)
    bad = ~np.isfinite(images).reshape(-1, int(np.prod(images.shape[-3:]))).all(axis=1)
    if bad.any():
        raise NonFiniteSamplesError(
            f"{int(bad.sum())} of {bad.size} {what} contain NaN or Inf values; with re-adjusted "
            "batch-norm statistics this is a known failure of some checkpoints (original NVAE "
            "issue #36): try without BN re-adjustment or with another temperature"
        )
    return images


def _check_temperatures(temperature, decoder_temperature):
    for name, value in (("temperature", temperature), ("decoder temperature", decoder_temperature)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
