"""The whole model: parameter counts from the original's rules, outputs, IW estimates, API."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import binary_images, colour_config, colour_images, tiny_config

from nvae_tf.config import NVAEConfig
from nvae_tf.inference.likelihood import importance_weighted
from nvae_tf.layers.normalization import queued_moving_averages
from nvae_tf.layers.weight_norm import normalized_together
from nvae_tf.model import NVAE
from nvae_tf.training.step_state import StepState

pytestmark = pytest.mark.usefixtures("seeded")

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- parameter count
# Written from the original's construction rules only (its AutoEncoder.__init__, model.py:104;
# docs/design.md#layout-rules, #cells, #latent-groups, #flows), not from nvae_tf: a second,
# independent description of the architecture.


def wn_conv(k, cin, cout, bias=True):
    """WN conv: kernel, per-output log-norm, optional bias (docs/design.md#weight-normalization)."""
    return k * k * cin * cout + cout + (cout if bias else 0)


def batch_norm(c):
    return 2 * c  # affine gamma, beta (running stats are not trainable)


def squeeze_excitation(c, use_se):
    if not use_se:
        return 0
    hidden = max(c // 16, 4)
    return c * hidden + hidden + hidden * c + c


def encoder_cell(c, down, use_se):
    """BN-Swish-Conv3x3 twice + SE (docs/design.md#cells); down cell: 2C, FactorizedReduce skip."""
    cout = 2 * c if down else c
    n = batch_norm(c) + wn_conv(3, c, cout) + batch_norm(cout) + wn_conv(3, cout, cout)
    n += squeeze_excitation(cout, use_se)
    if down:  # four WN 1x1 convs with bias, cout//4 channels each, the last takes the rest
        quarter = cout // 4
        n += sum(wn_conv(1, c, w) for w in (quarter, quarter, quarter, cout - 3 * quarter))
    return n


def decoder_cell(c, expansion, up, use_se):
    """Inverted residual (docs/design.md#cells): hidden from the INPUT width, inner convs plain."""
    cout = c // 2 if up else c
    hidden = c * expansion
    n = (
        batch_norm(c)
        + c * hidden
        + batch_norm(hidden)
        + 25 * hidden
        + batch_norm(hidden)
        + hidden * cout
        + batch_norm(cout)
        + squeeze_excitation(cout, use_se)
    )
    if up:  # bilinear + WN 1x1 conv without bias
        n += wn_conv(1, c, cout, bias=False)
    return n


def flow_pairs(num_nf, z):
    """num_nf IAF pairs (docs/design.md#flows): masked WN 3x3 z->6z, dw 5x5, 1x1 6z->z + bias."""
    cell = wn_conv(3, z, 6 * z, bias=False) + (25 * 6 * z + 6 * z) + wn_conv(1, 6 * z, z)
    return num_nf * 2 * cell


def spec_trainable_params(c):
    """Trainable parameters of the original NVAE built from config ``c``, by its own rules.

    Also returns the number of BN layers (2 per encoder cell, 4 per decoder cell;
    docs/design.md#batch-normalization).
    """
    z, se = c.num_latent_per_group, c.use_se
    # Groups per scale (docs/design.md#layout-rules), highest resolution first.
    groups, n = [], c.num_groups_per_scale
    for _ in range(c.num_latent_scales):
        groups.append(n)
        if c.ada_groups:
            n = max(c.min_groups_per_scale, n // 2)
    out_channels = 1 if c.decoder == "bernoulli" else 10 * c.num_mixture_dec

    total, enc_cells, dec_cells, mult = 0, 0, 0, 1
    total += wn_conv(3, c.image_channels, c.num_channels_enc)  # stem
    for _ in range(c.num_preprocess_blocks):  # last cell of each block is a down cell
        for cell in range(c.num_preprocess_cells):
            down = cell == c.num_preprocess_cells - 1
            total += encoder_cell(c.num_channels_enc * mult, down, se)
            enc_cells += 1
            mult *= 2 if down else 1
    for s in range(c.num_latent_scales):  # encoder tower, bottom-up
        for g in range(groups[s]):
            for _ in range(c.num_cell_per_cond_enc):
                total += encoder_cell(c.num_channels_enc * mult, False, se)
                enc_cells += 1
            if not (s == c.num_latent_scales - 1 and g == groups[s] - 1):
                # Encoder combiner: WN 1x1 from the decoder width to the encoder width.
                total += wn_conv(1, c.num_channels_dec * mult, c.num_channels_enc * mult)
        if s < c.num_latent_scales - 1:
            total += encoder_cell(c.num_channels_enc * mult, True, se)
            enc_cells += 1
            mult *= 2
    top_channels = c.num_channels_dec * mult
    total += wn_conv(1, c.num_channels_enc * mult, c.num_channels_enc * mult)  # enc0
    for s in range(c.num_latent_scales):  # decoder tower, top-down
        cenc, cdec = c.num_channels_enc * mult, c.num_channels_dec * mult
        for g in range(groups[c.num_latent_scales - 1 - s]):
            if s > 0 or g > 0:
                for _ in range(c.num_cell_per_cond_dec):
                    total += decoder_cell(cdec, 6, False, se)
                    dec_cells += 1
                total += wn_conv(1, cdec, 2 * z)  # dec_sampler (prior head)
            total += wn_conv(3, cenc, 2 * z)  # enc_sampler (posterior head)
            total += flow_pairs(c.num_nf, z)
            total += wn_conv(1, cdec + z, cdec)  # decoder combiner
        if s < c.num_latent_scales - 1:
            total += decoder_cell(cdec, 6, True, se)
            dec_cells += 1
            mult //= 2
    for _ in range(c.num_postprocess_blocks):  # first cell of each block is an up cell
        for cell in range(c.num_postprocess_cells):
            total += decoder_cell(c.num_channels_dec * mult, 3, cell == 0, se)
            dec_cells += 1
            mult //= 2 if cell == 0 else 1
    total += wn_conv(3, c.num_channels_dec * mult, out_channels)  # image_conditional
    top = c.image_size // 2 ** (c.num_preprocess_blocks + c.num_latent_scales - 1)
    total += top_channels * top * top  # h (prior_ftr0)
    return total, 2 * enc_cells + 4 * dec_cells


def trainable_params(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


@pytest.mark.parametrize(
    "make, overrides",
    [
        (tiny_config, {}),
        (
            tiny_config,
            {
                "num_cell_per_cond_enc": 2,
                "num_cell_per_cond_dec": 2,
                "use_se": False,
                "num_latent_per_group": 6,
                "num_channels_enc": 6,
                "num_channels_dec": 6,
            },
        ),
        (colour_config, {}),
        (
            colour_config,
            {
                "num_nf": 2,
                "num_mixture_dec": 3,
                "num_latent_scales": 1,
                "num_groups_per_scale": 3,
                "num_preprocess_cells": 3,
                "num_postprocess_cells": 3,
                "num_latent_per_group": 8,
            },
        ),
    ],
    ids=["bernoulli", "bernoulli_2cells_no_se", "mixture_flow", "mixture_2flows_1scale"],
)
def test_trainable_params_equal_spec_count(make, overrides):
    config = make(**overrides)
    model = NVAE(config)
    expected, num_bn = spec_trainable_params(config)
    assert trainable_params(model) == expected
    assert len(model.batchnorm_layers()) == num_bn
    # The non-trainable state is the BN running statistics and the spectral vectors only.
    names = [v.path for v in model.non_trainable_variables]
    assert sum("moving_mean" in n for n in names) == num_bn
    assert all(
        n.split("/")[-1] in ("moving_mean", "moving_variance") or n.split("/")[-2] == "spectral"
        for n in names
    ), names


def test_small_config_count_matches_nvae_info_cli():
    """``nvae-info --json`` reports the layout and the same count as ``spec_trainable_params``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.info", "--config", "configs/small.yaml", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    config = NVAEConfig.from_yaml(ROOT / "configs" / "small.yaml")
    assert info["trainable_params"] == spec_trainable_params(config)[0]
    assert info["num_groups"] == config.num_groups == 3
    assert info["groups_per_scale"] == config.groups_per_scale == [1, 2]
    assert info["channels_per_scale"] == config.channels_per_scale == [64, 32]
    assert info["h_shape"] == [4, 4, 64]


def test_nvae_info_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: bundled_mnist\nnum_chanels_enc: 3\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.info", "--config", str(bad)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "num_chanels_enc" in last
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- forward pass


def test_forward_outputs_bernoulli(bernoulli_model):
    x = binary_images(3)
    out = bernoulli_model(x, training=False, seed=[1, 2])
    L = bernoulli_model.config.num_groups
    assert out.kl.shape == (3, L)
    assert out.log_q.shape == (3,) and out.log_p.shape == (3,)
    assert out.kl_per_channel.shape == (L, 20)
    assert out.logits.shape == (3, 32, 32, 1)
    assert out.output_distribution.log_prob(x).shape == (3,)
    sizes = [8, 16, 16]  # top group at 8x8, then two groups at 16x16
    for mean, std, size in zip(out.posterior_mean, out.posterior_stddev, sizes):
        assert mean.shape == std.shape == (3, size, size, 20)
    for value in (out.kl, out.log_q, out.log_p, out.kl_per_channel, out.logits):
        assert value.dtype == tf.float32 and np.all(np.isfinite(value))
    # Without flows the KL is analytic, hence >= 0; kl_per_channel is its batch mean.
    assert np.all(out.kl.numpy() >= -1e-3)
    np.testing.assert_allclose(
        out.kl_per_channel.numpy().sum(axis=1), out.kl.numpy().mean(axis=0), rtol=1e-4
    )


def test_forward_outputs_mixture_with_flows(colour_model):
    x = colour_images(2)
    out = colour_model(x, training=False, seed=[1, 2])
    L = colour_model.config.num_groups
    assert out.kl.shape == (2, L) and out.kl_per_channel.shape == (L, 20)
    assert out.log_q.shape == (2,) and out.log_p.shape == (2,)
    assert out.logits.shape == (2, 16, 16, 100)
    assert out.output_distribution.log_prob(x).shape == (2,)
    # With flows the KL is the single-sample estimate log q - log p, summed over groups.
    np.testing.assert_allclose(
        out.kl.numpy().sum(axis=1), (out.log_q - out.log_p).numpy(), rtol=1e-4, atol=1e-2
    )


def test_mnist_likelihood_is_scored_on_the_28x28_crop(bernoulli_model):
    x = binary_images(2).numpy()
    out = bernoulli_model(x, training=False, seed=[1, 2])
    flipped = x.copy()
    flipped[:, :2] = 1 - flipped[:, :2]  # change only the 2-pixel border
    flipped[:, :, -2:] = 1 - flipped[:, :, -2:]
    decoder = out.output_distribution
    np.testing.assert_allclose(decoder.log_prob(x), decoder.log_prob(flipped), rtol=1e-6)


def _zero_posterior_head(group):
    head = group.posterior_head
    head.kernel.assign(tf.zeros_like(head.kernel))
    head.bias.assign(tf.zeros_like(head.bias))


def test_residual_posterior_equals_prior_when_encoder_outputs_are_zero():
    model = NVAE(tiny_config())
    x = binary_images(2)
    before = model(x, training=False, seed=[3, 3])
    assert np.all(before.kl.numpy()[:, 1:] > 1e-2)
    for group in model.groups[1:]:
        _zero_posterior_head(group)
    after = model(x, training=False, seed=[3, 3])
    # Analytic KL of q == p is zero for every residual group; the top group is not residual.
    np.testing.assert_allclose(after.kl.numpy()[:, 1:], 0.0, atol=1e-4)
    assert np.all(after.kl.numpy()[:, 0] > 1e-2)
    # Directly: the posterior's mean and stddev are the prior's.
    group = model.groups[1]
    s = tf.random.normal((2, 16, 16, 8), seed=1)
    q, p = group.posterior(s, tf.random.normal((2, 16, 16, 8), seed=2))
    np.testing.assert_allclose(q.mean(), p.mean(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q.stddev(), p.stddev(), rtol=1e-6, atol=1e-6)


def test_non_residual_posterior_with_zero_outputs_is_clamped_standard():
    model = NVAE(tiny_config(res_dist=False))
    group = model.groups[1]
    _zero_posterior_head(group)
    q, p = group.posterior(
        tf.random.normal((1, 16, 16, 8), seed=1), tf.random.normal((1, 16, 16, 8), seed=2)
    )
    np.testing.assert_allclose(q.mean(), 0.0, atol=1e-7)
    np.testing.assert_allclose(q.stddev(), 1.01, rtol=1e-6)  # exp(0) + 0.01
    assert np.abs(p.mean().numpy()).max() > 1e-3


def test_top_prior_sigma_is_1_01(bernoulli_model):
    p = bernoulli_model.groups[0].prior(tf.zeros((2, 8, 8, 16)), temperature=0.5)
    np.testing.assert_allclose(p.stddev(), 1.01 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(p.mean(), 0.0)


def test_decoder_sees_z_only(bernoulli_model):
    """Decoder output depends on x only via z (docs/design.md#forward-pass): same z, same logits."""
    model = bernoulli_model
    a = model(binary_images(2, seed=1), training=False, seed=[9, 9])
    b = model(binary_images(2, seed=2), training=False, seed=[9, 9])
    assert not np.allclose(a.logits, b.logits)
    # Walking the prior with the same seed twice gives the same logits.
    d1 = model.prior_output_distribution(2, seed=[4, 4]).mean()
    d2 = model.prior_output_distribution(2, seed=[4, 4]).mean()
    np.testing.assert_array_equal(d1, d2)


def test_kernels_normalized_together_change_nothing_but_the_graph():
    """The training step's kernels, weight-normalized by shape in one op chain each: the same
    loss and gradients (None where there were None) as per conv, in a smaller graph."""
    keras.utils.set_random_seed(3)
    model = NVAE(tiny_config())
    model.compile(steps_per_epoch=10)
    x = binary_images(4)
    convs = model.conv_layers()
    assert sum(c.weight_norm for c in convs) > len({(c.kernel.shape, c.depthwise) for c in convs})

    def step(together):
        with tf.GradientTape() as tape:
            with normalized_together(convs) if together else contextlib.nullcontext():
                out = model(x, training=True, seed=[1, 2])
            loss = model.objective(model, out, x, tf.constant(3)).loss
        return loss, tape.gradient(loss, model.trainable_variables)

    state = [v.numpy() for v in model.non_trainable_variables]
    results, sizes = [], []
    for together in (False, True):
        for variable, value in zip(model.non_trainable_variables, state):
            variable.assign(value)  # the same spectral u, v for both steps
        traced = tf.function(lambda together=together: step(together))
        sizes.append(len(traced.get_concrete_function().graph.get_operations()))
        results.append(traced())
    (loss_a, grads_a), (loss_b, grads_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    assert [g is None for g in grads_b] == [g is None for g in grads_a]
    for a, b in zip(grads_a, grads_b):
        if a is not None:
            # The kernels differ by an ulp (summation order), which training-mode BN over a
            # batch of 4 amplifies to ~1e-3 in some gradients.
            np.testing.assert_allclose(b, a, rtol=5e-3, atol=1e-5)
    assert sizes[1] < 0.97 * sizes[0]  # 6,554 -> 6,184 ops here
    assert all(c._given_kernel.key is None for c in convs)  # nothing left for later traces


def test_queued_moving_averages_give_the_same_statistics_bit_for_bit():
    """BN moving averages queued by the forward pass and applied by ``StepState`` with its
    skip guard: the same values as each layer updating its own, in a smaller graph; none
    when the step is skipped."""
    keras.utils.set_random_seed(3)
    model = NVAE(tiny_config())
    model.compile(steps_per_epoch=10)
    x = binary_images(4)
    stats = [v for v in model.non_trainable_variables if "moving_" in v.path]
    state = [v.numpy() for v in model.non_trainable_variables]

    def forward(queued, applied):
        guard = StepState(model)
        guard.snapshot()
        with queued_moving_averages() if queued else contextlib.nullcontext([]) as queue:
            logits = model(x, training=True, seed=[1, 2]).logits
        guard.restore_unless(tf.constant(applied), queue)
        return logits

    results, sizes = [], []
    for queued, applied in ((False, True), (True, True), (True, False)):
        for variable, value in zip(model.non_trainable_variables, state):
            variable.assign(value)
        traced = tf.function(lambda q=queued, a=applied: forward(q, a))
        sizes.append(len(traced.get_concrete_function().graph.get_operations()))
        results.append((traced().numpy(), [v.numpy() for v in stats]))
    (logits_a, stats_a), (logits_b, stats_b), (_, stats_skipped) = results
    np.testing.assert_array_equal(logits_b, logits_a)
    before = [v for v, var in zip(state, model.non_trainable_variables) if "moving_" in var.path]
    assert all(np.any(a != s) for a, s in zip(stats_a, before))  # the step did update them
    for a, b, skipped, s in zip(stats_a, stats_b, stats_skipped, before):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(skipped, s)
    assert sizes[1] < 0.95 * sizes[0]
    model(x, training=True)  # nothing is left queued: outside the context BNs update at once
    assert all(np.any(v.numpy() != a) for v, a in zip(stats, before))


# ---------------------------------------------------------- IW estimate (docs/design.md#evaluation)


@pytest.fixture(scope="module")
def iw_model():
    """A flow-free tiny model (evaluation runs BN in inference mode), fixed weights."""
    keras.utils.set_random_seed(7)
    return NVAE(tiny_config(num_latent_per_group=4))


def test_iw_with_one_sample_is_unbiased_for_the_elbo(iw_model):
    """E[log p(x|z) + log p(z) - log q(z)] = ELBO: with K = 1 both estimate the same number."""
    x = binary_images(2)
    reps = 96
    tiled = tf.tile(x, [reps, 1, 1, 1])  # independent repeats, BN in inference mode
    ll1, _ = importance_weighted(iw_model, tiled, 1, seed=[1, 1])
    _, elbo = importance_weighted(iw_model, tiled, 1, seed=[2, 2])
    ll1 = ll1.numpy().reshape(reps, 2)
    elbo = elbo.numpy().reshape(reps, 2)
    diff = ll1.mean(axis=0) - elbo.mean(axis=0)
    se = np.sqrt(ll1.var(axis=0, ddof=1) / reps + elbo.var(axis=0, ddof=1) / reps)
    assert np.all(np.abs(diff) < 4 * se + 0.05), (diff, se)
    # The one-sample IW estimate is noisier than the analytic-KL ELBO estimate.
    assert np.all(ll1.std(axis=0) > elbo.std(axis=0))


def test_iw_bound_is_above_elbo_and_tightens_with_k(iw_model):
    x = binary_images(2)
    reps = 8
    tiled = tf.tile(x, [reps, 1, 1, 1])
    estimates = {}
    for k in (1, 8, 64):
        ll, elbo = importance_weighted(iw_model, tiled, k, max_images_per_pass=1024, seed=[k, 0])
        estimates[k] = ll.numpy().reshape(reps, 2)
        if k == 64:
            elbo64 = elbo.numpy().reshape(reps, 2)
    means = {k: v.mean(axis=0) for k, v in estimates.items()}
    # Per image, on average: ELBO <= IW_1 (equal in expectation) < IW_8 < IW_64.
    assert np.all(means[64] > elbo64.mean(axis=0))
    assert np.all(means[8] > means[1]) and np.all(means[64] > means[8])
    # ... and the estimate's spread over repeats shrinks with K.
    assert np.all(estimates[64].std(axis=0) < estimates[1].std(axis=0))


def test_iw_log_weights_are_the_model_terms(iw_model):
    """log_w = log p(x|z) + log p(z) - log q(z) of the full model on the tiled batch: the
    encoder pass that the K samples share gives the same terms as one pass per sample."""
    x = binary_images(2)
    k, seed = 3, tf.constant([5, 5])
    ll, _ = importance_weighted(iw_model, x, k, max_images_per_pass=64, seed=seed)
    chunk_seed = tf.cast(tf.random.experimental.stateless_fold_in(seed, 0), tf.int64)
    tiled = tf.tile(x, [k, 1, 1, 1])  # one pass holds all K samples
    out = iw_model(tiled, training=False, seed=chunk_seed)
    log_w = (out.output_distribution.log_prob(tiled) + out.log_p - out.log_q).numpy()
    expected = tf.reduce_logsumexp(log_w.reshape(k, 2), axis=0) - np.log(k)
    np.testing.assert_allclose(ll, expected, rtol=1e-5)


def test_iw_chunking_is_deterministic_and_handles_a_partial_chunk(iw_model):
    x = binary_images(2)
    # 5 samples, 2 per pass (max_images_per_pass = 4 images for a batch of 2): 3 passes.
    a = iw_model.log_likelihood(x, tf.constant(5), tf.constant(4), seed=tf.constant([7, 7]))
    b = iw_model.log_likelihood(x, tf.constant(5), tf.constant(4), seed=tf.constant([7, 7]))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2,) and np.all(np.isfinite(a))
    c = iw_model.log_likelihood(x, tf.constant(5), tf.constant(4), seed=tf.constant([8, 7]))
    assert not np.allclose(a, c)
    # A partial last chunk adds exactly the valid samples: the masked surplus sample would
    # otherwise change the mean of the ELBO terms. Compare 5 samples in passes of 2 and of 5
    # over many repeats: the same distribution.
    reps = 48
    tiled = tf.tile(x, [reps, 1, 1, 1])
    by2 = importance_weighted(iw_model, tiled, 5, max_images_per_pass=2 * 2 * reps, seed=[1, 9])
    by5 = importance_weighted(iw_model, tiled, 5, max_images_per_pass=5 * 2 * reps, seed=[2, 9])
    for u, v in zip(by2, by5):
        u, v = u.numpy().reshape(reps, 2), v.numpy().reshape(reps, 2)
        se = np.sqrt(u.var(axis=0, ddof=1) / reps + v.var(axis=0, ddof=1) / reps)
        assert np.all(np.abs(u.mean(axis=0) - v.mean(axis=0)) < 4 * se + 0.05)


def test_iw_mixture_model_runs(colour_model):
    x = colour_images(2)
    ll = colour_model.log_likelihood(x, tf.constant(3), tf.constant(4), seed=tf.constant([1, 1]))
    elbo = colour_model.elbo(x, tf.constant(3), seed=tf.constant([1, 1]))
    assert ll.shape == elbo.shape == (2,)
    assert np.all(np.isfinite(ll)) and np.all(ll.numpy() < 0)


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 28, 28, 1), np.float32),
        np.zeros((2, 32, 32, 3), np.float32),
        np.zeros((32, 32, 1), np.float32),
        np.zeros((2, 32, 32, 1), np.uint8),
        np.zeros((2, 32, 32, 1), np.int32),
    ],
    ids=["28x28", "rgb", "rank3", "uint8", "int32"],
)
def test_bad_inputs_are_one_line_value_errors(bernoulli_model, bad):
    for fn in (
        lambda: bernoulli_model(bad, training=False),
        lambda: importance_weighted(bernoulli_model, bad, 1),
        lambda: bernoulli_model.reconstruct(bad),
    ):
        with pytest.raises(ValueError) as e:
            fn()
        message = str(e.value).strip()
        assert "\n" not in message and ("shape" in message or "dtype" in message), message


# ----------------------------------------------------------------------------- sampling, seeds


def test_sample_bernoulli_shapes_and_range(bernoulli_model):
    images = bernoulli_model.sample(3, temperature=0.7, seed=[1, 2]).numpy()
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.0  # Bernoulli means: probabilities, not all equal


def test_sample_mixture_shapes_and_range(colour_model):
    images = colour_model.sample(3, seed=[1, 2]).numpy()
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    recon = colour_model.reconstruct(colour_images(2), seed=[3, 4]).numpy()
    assert recon.shape == (2, 16, 16, 3) and recon.min() >= 0.0 and recon.max() <= 1.0


def test_seeds_make_sampling_and_forward_reproducible(bernoulli_model, colour_model):
    for model in (bernoulli_model, colour_model):
        a = model.sample(2, seed=[11, 12]).numpy()
        b = model.sample(2, seed=[11, 12]).numpy()
        c = model.sample(2, seed=[11, 13]).numpy()
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        size = model.config.image_size
        x = binary_images(2) if model.config.decoder == "bernoulli" else colour_images(2, size=size)
        f1 = model(x, training=False, seed=[5, 6])
        f2 = model(x, training=False, seed=[5, 6])
        f3 = model(x, training=False, seed=[5, 7])
        np.testing.assert_array_equal(f1.kl, f2.kl)
        np.testing.assert_array_equal(f1.logits, f2.logits)
        assert not np.array_equal(f1.logits, f3.logits)
        np.testing.assert_array_equal(
            model.reconstruct(x, seed=[1, 1]), model.reconstruct(x, seed=[1, 1])
        )


def test_without_seed_the_generator_advances_and_is_reproducible_from_config_seed():
    m1, m2 = NVAE(tiny_config(seed=3)), NVAE(tiny_config(seed=3))
    m2.set_weights(m1.get_weights())
    m2.noise.reset_from_seed(3)
    m1.noise.reset_from_seed(3)
    a1, a2 = m1.sample(2).numpy(), m1.sample(2).numpy()
    b1, b2 = m2.sample(2).numpy(), m2.sample(2).numpy()
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)


def test_keras_seed_makes_initial_weights_reproducible():
    """Weight init follows Keras' global seed (keras.utils.set_random_seed)."""
    keras.utils.set_random_seed(123)
    a = NVAE(tiny_config())
    keras.utils.set_random_seed(123)
    b = NVAE(tiny_config())
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(u, v)


def test_temperature_scales_prior_samples(bernoulli_model):
    """Lower temperature -> latent samples closer to the prior means: smaller spread of z."""
    model = bernoulli_model
    s = tf.zeros((64, 8, 8, 16))
    z_hot = model.groups[0].prior(s, 1.0).sample(seed=[1, 1])
    z_cold = model.groups[0].prior(s, 0.5).sample(seed=[1, 1])
    np.testing.assert_allclose(z_cold, 0.5 * z_hot.numpy(), rtol=1e-5, atol=1e-6)
