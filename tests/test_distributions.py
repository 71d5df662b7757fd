"""Tests for nvae_tf.distributions (docs/design.md#latent-distributions, #output-distributions)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from nvae_tf.distributions import (
    CroppedBernoulli,
    DiscretizedLogisticMixture,
    latent_normal,
    residual_normal,
    soft_clamp,
    top_prior,
)

tfd = tfp.distributions


# ---------------------------------------------------------------------------------------------
# Helpers for the logistic mixture: params built from named per-channel values, and a brute-force
# float64 numpy reference written from the channel layout and formula of the original
# (docs/design.md#output-distributions).
# ---------------------------------------------------------------------------------------------


def _make_params(logits, means, log_scales, raw_coeffs):
    """logits (..., M); means, log_scales, raw_coeffs (..., 3, M) -> NHWC params (..., 10M).

    Channel M + c*3M + k*M + m holds quantity k (mean, log-scale, coeff) of colour c, mixture m.
    """
    logits = np.asarray(logits, np.float64)
    m = logits.shape[-1]
    params = np.zeros(logits.shape[:-1] + (10 * m,), np.float64)
    params[..., :m] = logits
    for c in range(3):
        for k, q in enumerate((means, log_scales, raw_coeffs)):
            start = m + c * 3 * m + k * m
            params[..., start : start + m] = np.asarray(q, np.float64)[..., c, :]
    return params.astype(np.float32)


def _unpack_params(params):
    params = np.asarray(params, np.float64)
    m = params.shape[-1] // 10
    get = lambda c, k: params[..., m + c * 3 * m + k * m : m + c * 3 * m + (k + 1) * m]
    logits = params[..., :m]
    means = [get(c, 0) for c in range(3)]
    log_scales = [np.maximum(get(c, 1), -7.0) for c in range(3)]
    coeffs = [np.tanh(get(c, 2)) for c in range(3)]
    return logits, means, log_scales, coeffs


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_log_prob(params, pixels, num_bits, upper_edge):
    """Literal float64 transcription of the mixture formula for integer pixel values."""
    logits, means, log_scales, coeffs = _unpack_params(params)
    max_val = 2.0**num_bits - 1.0
    x = 2.0 * pixels / max_val - 1.0
    xr, xg, xb = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    mus = [means[0], means[1] + coeffs[0] * xr, means[2] + coeffs[1] * xr + coeffs[2] * xg]
    total = _log_softmax(logits)
    for xc, mu, ls in zip((xr, xg, xb), mus, log_scales):
        s = np.exp(ls)
        plus_in = (xc - mu + 1.0 / max_val) / s
        min_in = (xc - mu - 1.0 / max_val) / s
        mid_in = (xc - mu) / s
        delta = _sigmoid(plus_in) - _sigmoid(min_in)
        log_pdf = mid_in - ls - 2.0 * np.logaddexp(0.0, mid_in)
        with np.errstate(divide="ignore"):
            mid = np.where(
                delta > 1e-5, np.log(np.maximum(delta, 1e-300)), log_pdf - np.log(max_val / 2.0)
            )
        lp = np.where(
            xc < -0.999,
            -np.logaddexp(0.0, -plus_in),
            np.where(xc > upper_edge, -np.logaddexp(0.0, min_in), mid),
        )
        total = total + lp
    top = total.max(-1)
    return top + np.log(np.exp(total - top[..., None]).sum(-1))


def _edge_heavy_params(rng, pixels, m, coeff_scale):
    """Random params whose means include values at and beyond the [-1, 1] edges."""
    means = rng.uniform(-1.3, 1.3, size=(pixels, 1, 1, 3, m))
    edge_values = np.array([-1.0, 1.0, 0.995, -0.995, 0.99, 1.2])
    means.reshape(-1)[: len(edge_values)] = edge_values
    log_scales = rng.uniform(-7.5, 0.5, size=(pixels, 1, 1, 3, m))
    log_scales.reshape(-1)[:3] = [-9.0, -7.0, -4.0]
    raw_coeffs = coeff_scale * rng.normal(size=(pixels, 1, 1, 3, m))
    logits = rng.normal(size=(pixels, 1, 1, m))
    return _make_params(logits, means, log_scales, raw_coeffs)


def _full_mass(params, num_bits, original_edge=False):
    """Total pmf over every RGB triple of each pixel, by enumeration: shape (pixels,)."""
    levels = 2**num_bits
    grid = np.stack(np.meshgrid(*[np.arange(levels)] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = (grid / (levels - 1.0)).astype(np.float32)[:, None, None, None, :]
    dist = DiscretizedLogisticMixture(params, num_bits=num_bits, original_edge=original_edge)
    log_probs = dist.log_prob(images).numpy().astype(np.float64)  # (levels^3, pixels, 1, 1)
    return np.exp(log_probs).sum(0)[:, 0, 0]


def _factorised_mass_8bit(means, log_scales, original_edge):
    """Total 8-bit pmf of single-component, uncoupled pixels from 3 x 256 evaluations.

    With M = 1 and zero coefficients, log p(r, g, b) = a(r) + b(g) + c(b), so
    sum_rgb p = sum_r e^{lp(r,g0,b0)} * sum_g e^{lp(r0,g,b0)} * sum_b e^{lp(r0,g0,b)} / e^{2 lp0}.
    The reference (r0, g0, b0) is the grid value nearest each channel mean (well-conditioned lp0).
    """
    pixels = means.shape[0]
    params = _make_params(np.zeros((pixels, 1, 1, 1)), means, log_scales, np.zeros_like(means))
    dist = DiscretizedLogisticMixture(params, num_bits=8, original_edge=original_edge)
    ref = np.round((np.clip(means[:, 0, 0, :, 0], -1, 1) + 1) / 2 * 255)  # (pixels, 3)
    images = np.repeat(ref[None], 256 * 3 + 1, axis=0)  # (769, pixels, 3)
    for c in range(3):
        images[1 + 256 * c : 1 + 256 * (c + 1), :, c] = np.arange(256)[:, None]
    images = (images / 255.0).astype(np.float32)[:, :, None, None, :]
    lp = dist.log_prob(images).numpy().astype(np.float64)[:, :, 0, 0]  # (769, pixels)
    log_sums = [np.log(np.exp(lp[1 + 256 * c : 1 + 256 * (c + 1)]).sum(0)) for c in range(3)]
    return np.exp(sum(log_sums) - 2.0 * lp[0])


# ---------------------------------------------------------------------------------------------
# Discretized logistic mixture
# ---------------------------------------------------------------------------------------------


def test_dml_shapes_and_dtype():
    params = tf.random.normal([2, 3, 4, 30], seed=1)
    dist = DiscretizedLogisticMixture(params)
    assert dist.batch_shape == (2, 3, 4)
    assert dist.event_shape == (3,)
    assert dist.num_mixtures == 3
    images = tf.random.uniform([2, 3, 4, 3], seed=2)
    assert dist.log_prob(images).shape == (2, 3, 4)
    assert dist.sample().shape == (2, 3, 4, 3)
    assert dist.sample(5, seed=(1, 2)).shape == (5, 2, 3, 4, 3)
    assert dist.mean().shape == (2, 3, 4, 3)
    assert dist.log_prob(images).dtype == tf.float32


def test_dml_rejects_bad_layout_and_bits():
    with pytest.raises(ValueError):
        DiscretizedLogisticMixture(tf.zeros([1, 2, 2, 25]))
    with pytest.raises(ValueError):
        DiscretizedLogisticMixture(tf.zeros([1, 2, 2, 10]), num_bits=9)


def test_dml_mass_sums_to_one_5bit_full_enumeration():
    rng = np.random.RandomState(0)
    params = _edge_heavy_params(rng, pixels=6, m=3, coeff_scale=1.0)
    np.testing.assert_allclose(_full_mass(params, 5), 1.0, atol=1e-5)


def test_dml_original_edge_is_still_normalised_at_5bit():
    rng = np.random.RandomState(1)
    params = _edge_heavy_params(rng, pixels=6, m=3, coeff_scale=1.0)
    np.testing.assert_allclose(_full_mass(params, 5, original_edge=True), 1.0, atol=1e-5)


def _pixels_8bit():
    rng = np.random.RandomState(2)
    means = rng.uniform(-1.2, 1.2, size=(12, 1, 1, 3, 1))
    means[:4, 0, 0, :, 0] = [
        [1.0, -1.0, 0.0],
        [0.997, -0.997, 0.99],
        [1.1, 0.994, -1.2],
        [253 / 255, 251 / 255, 0.5],
    ]
    log_scales = rng.uniform(-6.0, 1.0, size=means.shape)
    log_scales[:4, 0, 0, :, 0] = [
        [-3.0, -3.0, -9.0],
        [-7.0, -4.5, -2.0],
        [-1.0, -5.0, 0.0],
        [-4.0, -5.5, -6.0],
    ]
    return means, log_scales


def test_dml_mass_sums_to_one_8bit():
    # The original's fallback (log pdf + log bin width when a bin's mass < 1e-5) is itself
    # biased by up to ~1e-5 per channel for the narrowest logistics (s ~ e^-7); these pixels
    # include such channels and stay well inside the tolerance.
    means, log_scales = _pixels_8bit()
    np.testing.assert_allclose(_factorised_mass_8bit(means, log_scales, False), 1.0, atol=1e-5)


def test_dml_original_edge_breaks_normalisation_at_8bit():
    means, log_scales = _pixels_8bit()
    mass = _factorised_mass_8bit(means, log_scales, original_edge=True)
    # Value 254 (x = 253/255 > 0.99) also gets the upper-tail mass: some pixels exceed 1.
    assert mass.max() > 1.05
    assert np.all(mass > 1.0 - 1e-5)


def test_dml_original_edge_only_changes_value_254():
    rng = np.random.RandomState(3)
    params = rng.normal(size=(2, 4, 4, 20)).astype(np.float32)
    pixels = rng.randint(0, 254, size=(2, 4, 4, 3))  # 0..253
    pixels[0, 1] = [255, 0, 255]
    pixels[0, 0] = [254, 10, 20]
    pixels[1, 1] = [255, 254, 0]
    images = (pixels / 255.0).astype(np.float32)
    correct = DiscretizedLogisticMixture(params).log_prob(images).numpy()
    quirk = DiscretizedLogisticMixture(params, original_edge=True).log_prob(images).numpy()
    has_254 = (pixels == 254).any(-1)
    assert has_254.sum() >= 2
    np.testing.assert_array_equal(correct[~has_254], quirk[~has_254])
    assert np.all(correct[has_254] != quirk[has_254])


@pytest.mark.parametrize("num_bits,original_edge", [(8, False), (8, True), (5, False)])
def test_dml_log_prob_matches_numpy_reference(num_bits, original_edge):
    rng = np.random.RandomState(4 + num_bits)
    m = 4
    params = _make_params(
        rng.normal(size=(2, 3, 3, m)),
        rng.uniform(-1.2, 1.2, size=(2, 3, 3, 3, m)),
        rng.uniform(-8.0, 1.0, size=(2, 3, 3, 3, m)),
        rng.normal(size=(2, 3, 3, 3, m)),
    )
    levels = 2**num_bits
    pixels = rng.randint(0, levels, size=(2, 3, 3, 3))
    pixels[0, 0, 0] = [0, levels - 1, levels - 2]
    pixels[1, 2, 2] = [levels - 1, 0, 1]
    images = (pixels / (levels - 1.0)).astype(np.float32)
    dist = DiscretizedLogisticMixture(params, num_bits=num_bits, original_edge=original_edge)
    got = tf.function(dist.log_prob)(images).numpy()
    want = _reference_log_prob(params, pixels, num_bits, 0.99 if original_edge else 0.999)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dml_gradient_builds_no_params_sized_slice_gradients():
    params = tf.random.stateless_normal((2, 4, 4, 40), seed=(1, 2))
    images = tf.fill((2, 4, 4, 3), 0.5)

    @tf.function
    def gradient(p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(DiscretizedLogisticMixture(p, num_bits=8).log_prob(images))
        return tape.gradient(loss, p)

    graph = gradient.get_concrete_function(params).graph
    assert "StridedSliceGrad" not in {op.type for op in graph.get_operations()}
    assert np.isfinite(gradient(params).numpy()).all()


def test_dml_validate_args_checks_pixels_and_temperature():
    params = tf.zeros([1, 1, 1, 10])
    with pytest.raises(tf.errors.InvalidArgumentError):
        DiscretizedLogisticMixture(params, validate_args=True).log_prob(tf.fill([1, 1, 1, 3], 1.5))
    with pytest.raises(tf.errors.InvalidArgumentError):
        DiscretizedLogisticMixture(params, temperature=0.0, validate_args=True)


def test_dml_casts_low_precision_params_to_float32():
    params = tf.random.normal([1, 2, 2, 20], seed=5)
    images = tf.random.uniform([1, 2, 2, 3], seed=6)
    half = tf.cast(params, tf.float16)
    got = DiscretizedLogisticMixture(half).log_prob(images)
    want = DiscretizedLogisticMixture(tf.cast(half, tf.float32)).log_prob(images)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_dml_mean_single_component_without_coupling():
    mu = np.array([[-1.4, -0.3, 0.8], [0.2, 1.5, -1.0]]).reshape(2, 1, 1, 3, 1)
    params = _make_params(np.zeros((2, 1, 1, 1)), mu, np.full_like(mu, -2.0), np.zeros_like(mu))
    got = DiscretizedLogisticMixture(params).mean().numpy()
    np.testing.assert_allclose(got, (np.clip(mu[..., 0], -1, 1) + 1) / 2, atol=1e-6)


def test_dml_mean_mixture_with_rgb_coupling():
    rng = np.random.RandomState(7)
    m = 3
    params = _make_params(
        rng.normal(size=(4, 1, 1, m)),
        rng.uniform(-1, 1, size=(4, 1, 1, 3, m)),
        rng.normal(size=(4, 1, 1, 3, m)),
        2.0 * rng.normal(size=(4, 1, 1, 3, m)),
    )
    logits, means, _, coeffs = _unpack_params(params)
    w = np.exp(_log_softmax(logits))
    mu = [(w * q).sum(-1) for q in means]
    c = [(w * q).sum(-1) for q in coeffs]
    r = np.clip(mu[0], -1, 1)
    g = np.clip(mu[1] + c[0] * r, -1, 1)
    b = np.clip(mu[2] + c[1] * r + c[2] * g, -1, 1)
    want = (np.stack([r, g, b], -1) + 1) / 2
    got = DiscretizedLogisticMixture(params).mean().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - (np.clip(np.stack(mu, -1), -1, 1) + 1) / 2).max() > 1e-2  # coupling active


def _single_logistic(n_pixels, log_scale, mean=0.0, coeff=0.0):
    mu = np.full((n_pixels, 1, 1, 3, 1), mean)
    return _make_params(
        np.zeros((n_pixels, 1, 1, 1)), mu, np.full_like(mu, log_scale), np.full_like(mu, coeff)
    )


def test_dml_samples_in_unit_range_and_shape():
    rng = np.random.RandomState(8)
    params = (3.0 * rng.normal(size=(2, 3, 3, 30))).astype(np.float32)
    samples = DiscretizedLogisticMixture(params, num_bits=5).sample(7, seed=(3, 4)).numpy()
    assert samples.shape == (7, 2, 3, 3, 3)
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert samples.std() > 0.05


def test_dml_sample_takes_the_models_int64_stateless_seeds():
    """nvae-sample draws colour samples with the int64 stateless seeds the model uses."""
    params = np.random.RandomState(9).normal(size=(1, 2, 2, 10)).astype(np.float32)
    dist = tfd.Independent(DiscretizedLogisticMixture(params), reinterpreted_batch_ndims=2)
    seed = tf.constant([-1359977007, -1], tf.int64)
    a, b = dist.sample(seed=seed).numpy(), dist.sample(seed=seed).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 2, 2, 3)


def _sample_std(temperature, original_temperature):
    params = _single_logistic(4000, np.log(0.05))
    dist = DiscretizedLogisticMixture(
        params, temperature=temperature, original_temperature=original_temperature
    )
    return dist.sample(seed=(5, 6)).numpy().std()


def test_dml_sample_temperature_multiplies_scale():
    base = _sample_std(1.0, False)
    np.testing.assert_allclose(base, 0.5 * 0.05 * np.pi / np.sqrt(3), rtol=0.05)  # logistic std
    np.testing.assert_allclose(_sample_std(0.5, False) / base, 0.5, rtol=0.05)


def test_dml_original_temperature_divides_scale():
    base = _sample_std(1.0, True)
    np.testing.assert_allclose(_sample_std(0.5, True) / base, 2.0, rtol=0.05)


def test_dml_near_zero_temperature_collapses_to_top_component_location():
    means = np.stack([np.full((64, 1, 1, 3), 0.4), np.full((64, 1, 1, 3), -0.6)], -1)
    logits = np.tile(np.array([1.0, 0.0]), (64, 1, 1, 1))
    params = _make_params(logits, means, np.full(means.shape, -1.0), np.zeros(means.shape))
    cold = DiscretizedLogisticMixture(params, temperature=1e-3).sample(seed=(7, 8)).numpy()
    np.testing.assert_allclose(cold, 0.7, atol=1e-3)
    warm = DiscretizedLogisticMixture(params).sample(seed=(7, 8)).numpy()
    assert warm.std() > 0.1


def test_dml_sample_uses_rgb_coupling():
    params = _single_logistic(16, -3.0, mean=0.7, coeff=np.arctanh(0.4))
    got = DiscretizedLogisticMixture(params, temperature=1e-4).sample(seed=(1, 1)).numpy()
    r = 0.7
    g = 0.7 + 0.4 * r
    b = min(0.7 + 0.4 * r + 0.4 * g, 1.0)  # 1.37 before the clamp
    np.testing.assert_allclose(
        got, np.broadcast_to((np.array([r, g, b]) + 1) / 2, got.shape), atol=1e-3
    )


def test_dml_sample_works_in_tf_function():
    params = tf.random.normal([1, 2, 2, 10], seed=9)
    sample = tf.function(lambda p: DiscretizedLogisticMixture(p, num_bits=5).sample(3))(params)
    assert sample.shape == (3, 1, 2, 2, 3)


# ---------------------------------------------------------------------------------------------
# Latent Normal
# ---------------------------------------------------------------------------------------------


def test_soft_clamp_bounds_and_values():
    x = tf.constant([-1e4, -7.0, 0.0, 1.0, 1e4])
    y = soft_clamp(x).numpy()
    assert np.all(np.abs(y) <= 5.0)
    np.testing.assert_allclose(y, 5 * np.tanh(x.numpy() / 5), rtol=1e-6)
    dist = latent_normal(x, x, temperature=0.5)
    assert np.all(np.abs(dist.loc.numpy()) <= 5.0)
    scale = dist.scale.numpy()
    assert np.all(scale >= 0.5 * (np.exp(-5) + 0.01) - 1e-7)
    assert np.all(scale <= 0.5 * (np.exp(5) + 0.01) + 1e-3)
    np.testing.assert_allclose(scale[3], 0.5 * (np.exp(5 * np.tanh(0.2)) + 0.01), rtol=1e-6)


def test_latent_normal_casts_to_float32():
    dist = latent_normal(tf.zeros([2], tf.float16), tf.zeros([2], tf.bfloat16))
    assert dist.dtype == tf.float32
    assert isinstance(dist, tfd.Normal)


def test_top_prior_stddev():
    for t in (1.0, 0.7):
        prior = top_prior([2, 3], temperature=t)
        assert prior.batch_shape == (2, 3)
        np.testing.assert_allclose(prior.stddev().numpy(), 1.01 * t, rtol=1e-6)
        np.testing.assert_array_equal(prior.mean().numpy(), 0.0)


def test_residual_posterior_equals_prior_with_zero_deltas():
    rng = np.random.RandomState(10)
    mu, ls = rng.normal(size=(2, 4)) * 4, rng.normal(size=(2, 4)) * 4
    prior = latent_normal(mu, ls)
    post = residual_normal(mu, ls, np.zeros_like(mu), np.zeros_like(ls))
    np.testing.assert_array_equal(post.loc.numpy(), prior.loc.numpy())
    np.testing.assert_array_equal(post.scale.numpy(), prior.scale.numpy())
    np.testing.assert_array_equal(tfd.kl_divergence(post, prior).numpy(), 0.0)


def test_residual_posterior_sums_before_clamping():
    post = residual_normal(
        tf.constant([4.0]), tf.constant([4.0]), tf.constant([4.0]), tf.constant([-1.0])
    )
    np.testing.assert_allclose(post.loc.numpy(), 5 * np.tanh(8.0 / 5), rtol=1e-6)
    np.testing.assert_allclose(post.scale.numpy(), np.exp(5 * np.tanh(3.0 / 5)) + 0.01, rtol=1e-6)


def test_latent_kl_matches_formula_and_monte_carlo():
    rng = np.random.RandomState(11)
    q = latent_normal(rng.normal(size=4), rng.normal(size=4) * 0.5)
    p = latent_normal(rng.normal(size=4), rng.normal(size=4) * 0.5)
    kl = tfd.kl_divergence(q, p).numpy()
    mq, sq, mp, sp = q.loc.numpy(), q.scale.numpy(), p.loc.numpy(), p.scale.numpy()
    formula = 0.5 * ((mq - mp) / sp) ** 2 + 0.5 * (sq / sp) ** 2 - 0.5 - np.log(sq / sp)
    np.testing.assert_allclose(kl, formula, rtol=1e-5, atol=1e-6)
    z = q.sample(200000, seed=(1, 2))
    log_ratio = (q.log_prob(z) - p.log_prob(z)).numpy()
    stderr = log_ratio.std(0) / np.sqrt(log_ratio.shape[0])
    # Tolerance: 5 Monte-Carlo standard errors.
    assert np.all(np.abs(log_ratio.mean(0) - kl) < 5 * stderr + 1e-4)


def test_latent_sample_is_reparameterized():
    mu = tf.Variable([0.3, -0.2])
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(latent_normal(mu, tf.zeros([2])).sample(seed=(1, 1)))
    grad = tape.gradient(total, mu).numpy()
    np.testing.assert_allclose(grad, 1 - np.tanh(mu.numpy() / 5) ** 2, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Cropped Bernoulli
# ---------------------------------------------------------------------------------------------


def _bernoulli_inputs():
    logits = tf.random.normal([3, 32, 32, 1], seed=12)
    images = tf.cast(tf.random.uniform([3, 32, 32, 1], seed=13) < 0.5, tf.float32)
    return logits, images


def test_cropped_bernoulli_shapes():
    logits, images = _bernoulli_inputs()
    dist = CroppedBernoulli(logits)
    assert dist.batch_shape == (3,)
    assert dist.event_shape == (32, 32, 1)
    assert dist.log_prob(images).shape == (3,)
    sample = dist.sample(seed=(1, 2))
    assert sample.shape == (3, 32, 32, 1) and sample.dtype == tf.float32
    assert set(np.unique(sample.numpy())) <= {0.0, 1.0}
    assert dist.sample(2, seed=(1, 2)).shape == (2, 3, 32, 32, 1)
    np.testing.assert_allclose(dist.mean().numpy(), tf.sigmoid(logits).numpy(), rtol=1e-6)


def test_cropped_bernoulli_equals_bernoulli_on_crop():
    logits, images = _bernoulli_inputs()
    want = tf.reduce_sum(
        tfd.Bernoulli(logits=logits[:, 2:30, 2:30]).log_prob(images[:, 2:30, 2:30]), [1, 2, 3]
    )
    got = CroppedBernoulli(logits).log_prob(images)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)


def test_cropped_bernoulli_ignores_border():
    logits, images = _bernoulli_inputs()
    dist = CroppedBernoulli(logits)
    border = np.ones([32, 32, 1], bool)
    border[2:30, 2:30] = False
    flipped_border = tf.where(border, 1.0 - images, images)
    np.testing.assert_array_equal(
        dist.log_prob(flipped_border).numpy(), dist.log_prob(images).numpy()
    )
    interior = np.zeros([32, 32, 1], bool)
    interior[2, 2] = interior[29, 29] = True
    flipped_interior = tf.where(interior, 1.0 - images, images)
    assert np.all(dist.log_prob(flipped_interior).numpy() != dist.log_prob(images).numpy())


def test_cropped_bernoulli_validate_args_rejects_non_binary_pixels():
    logits, images = _bernoulli_inputs()
    with pytest.raises(tf.errors.InvalidArgumentError):
        CroppedBernoulli(logits, validate_args=True).log_prob(images * 0.5)


def test_dml_log_prob_gradients_finite_for_extreme_params():
    rng = np.random.RandomState(14)
    params = tf.Variable((30.0 * rng.normal(size=(2, 3, 3, 20))).astype(np.float32))
    images = (rng.randint(0, 256, size=(2, 3, 3, 3)) / 255.0).astype(np.float32)
    images[0, 0, 0] = [0.0, 1.0, 254 / 255]
    with tf.GradientTape() as tape:
        loss = -tf.reduce_sum(DiscretizedLogisticMixture(params).log_prob(images))
    grad = tape.gradient(loss, params).numpy()
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(grad))
