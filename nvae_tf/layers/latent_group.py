"""One latent group of the hierarchy: the decoder cells before it, its prior and posterior.

Group 0 is the top (lowest-resolution) group: its prior is the fixed Normal(0, 1.01) and its
posterior comes from ``enc0`` on the final bottom-up feature. Every later group predicts its
prior from the top-down state and forms its posterior residually from the bottom-up feature
mixed in by the encoder combiner (paper §2, §3.2; docs/design.md#latent-groups).
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from nvae_tf.distributions import latent_normal, residual_normal, top_prior
from nvae_tf.layers.cells import DecoderCell
from nvae_tf.layers.combiners import DecoderCombiner, EncoderCombiner
from nvae_tf.layers.flows import PosteriorFlow
from nvae_tf.layers.tracking import CheckpointListsMixin
from nvae_tf.layers.weight_norm import Conv2D


class GroupOutput(NamedTuple):
    """One group's part of a posterior pass: per-image sums (B,) unless noted."""

    kl: tf.Tensor  # KL(q || p) (analytic, or log q - log p at the sample with flows)
    log_q: tf.Tensor
    log_p: tf.Tensor
    kl_per_channel: tf.Tensor  # (C_z,) batch mean
    posterior_mean: tf.Tensor  # (B, h, w, C_z)
    posterior_stddev: tf.Tensor


@keras.saving.register_keras_serializable(package="nvae_tf")
class LatentGroup(CheckpointListsMixin, keras.layers.Layer):
    """Args:
    index: position in top-down order (0 = top group).
    upsample: the group starts a new scale (an up cell precedes its cells).
    num_cells: decoder cells run before the group (0 for the top group).
    decoder_channels / encoder_channels: widths at this group's scale.
    latent_channels: channels of z (20 in the paper).
    num_flows: IAF pairs applied to the posterior sample.
    residual_posterior: posterior parametrised relative to the prior (``res_dist``).
    use_se: squeeze-excitation in the cells.
    """

    def __init__(
        self,
        index,
        upsample,
        num_cells,
        decoder_channels,
        encoder_channels,
        latent_channels=20,
        num_flows=0,
        residual_posterior=True,
        use_se=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.index = int(index)
        self.upsample = bool(upsample)
        self.num_cells = int(num_cells)
        self.decoder_channels = int(decoder_channels)
        self.encoder_channels = int(encoder_channels)
        self.latent_channels = int(latent_channels)
        self.num_flows = int(num_flows)
        self.residual_posterior = bool(residual_posterior)
        self.use_se = bool(use_se)
        # True: every z is its distribution's mean instead of a sample (zero latent noise),
        # for exact comparisons with the original (nvae_tf.pretrained.verification).
        self.use_mean = False

        # The model runs these (it owns the recompute policy) before calling the group.
        self.cells = (
            [DecoderCell(6, upsample=True, use_se=use_se, name="up_cell")] if upsample else []
        )
        self.cells += [DecoderCell(6, use_se=use_se, name=f"cell_{i}") for i in range(num_cells)]
        if self.is_top:
            self.enc0 = Conv2D(self.encoder_channels, 1, name="enc0")
        else:
            self.prior_head = Conv2D(2 * latent_channels, 1, name="prior_head")
            self.encoder_combiner = EncoderCombiner(self.encoder_channels, name="encoder_combiner")
        self.posterior_head = Conv2D(2 * latent_channels, 3, name="posterior_head")
        self.flow = PosteriorFlow(num_flows, latent_channels, name="flow") if num_flows else None
        self.decoder_combiner = DecoderCombiner(self.decoder_channels, name="decoder_combiner")

    def build(self, s_shape):
        # Nothing of its own: the sublayers build on their first call. Defined so that Keras
        # does not trace ``call`` symbolically to find unbuilt state (2.5 s of MNIST's start-up).
        pass

    @property
    def is_top(self):
        return self.index == 0

    def prior(self, s, temperature=1.0):
        """p(z_l | z_<l): the fixed top prior, or predicted from the top-down state."""
        if self.is_top:
            shape = tf.concat([tf.shape(s)[:3], [self.latent_channels]], axis=0)
            return top_prior(shape, temperature)
        return latent_normal(*self._prior_params(s), temperature)

    def posterior(self, s, encoder_feature):
        """q(z_l | x, z_<l) and the prior, from the bottom-up feature and the top-down state."""
        if self.is_top:
            feature = tf.nn.elu(self.enc0(tf.nn.elu(encoder_feature)))
            return latent_normal(*_split(self.posterior_head(feature))), self.prior(s)
        prior_params = self._prior_params(s)
        feature = self.encoder_combiner(encoder_feature, s)
        delta = _split(self.posterior_head(feature))
        q = (
            residual_normal(*prior_params, *delta)
            if self.residual_posterior
            else latent_normal(*delta)
        )
        return q, latent_normal(*prior_params)

    def call(self, s, encoder_feature, seed, training=None):
        """Posterior pass; returns the new top-down state and this group's ``GroupOutput``.

        ``seed`` is a stateless seed (shape (2,) int32) for the posterior sample.
        """
        q, prior = self.posterior(s, encoder_feature)
        z = q.mean() if self.use_mean else q.sample(seed=seed)
        log_q = q.log_prob(z)
        log_det = None
        if self.flow is not None:
            # Flows are volume preserving (log-det 0, docs/design.md#flows) but subtracted for
            # generality. The flow returns a per-sample (B,) log-det, and its output in the
            # layer's compute dtype: the distributions work in float32.
            z, log_det = self.flow(z)
            z = tf.cast(z, tf.float32)
            log_det = tf.cast(log_det, tf.float32)
        log_p = prior.log_prob(z)
        # KL: one-sample estimate with flows, else analytic (docs/design.md#latent-distributions).
        kl = log_q - log_p if self.flow is not None else q.kl_divergence(prior)
        log_q_sum = tf.reduce_sum(log_q, axis=[1, 2, 3])
        kl_sum = tf.reduce_sum(kl, axis=[1, 2, 3])
        if log_det is not None:
            log_q_sum -= log_det
            kl_sum -= log_det
        group_output = GroupOutput(
            kl=kl_sum,
            log_q=log_q_sum,
            log_p=tf.reduce_sum(log_p, axis=[1, 2, 3]),
            kl_per_channel=tf.reduce_mean(tf.reduce_sum(kl, axis=[1, 2]), axis=0),
            posterior_mean=q.mean(),
            posterior_stddev=q.stddev(),
        )
        return self.decoder_combiner(s, z), group_output

    def sample(self, s, seed, temperature=1.0):
        """Generation pass: draw z from the prior at ``temperature`` (stateless ``seed``)."""
        prior = self.prior(s, temperature)
        z = prior.mean() if self.use_mean else prior.sample(seed=seed)
        return self.combine(s, z)

    def combine(self, s, z):
        """The top-down state after this group, given its latent ``z`` (B, h, w, C_z).

        With flows, ``z`` is the post-flow latent (what the decoder combiner consumes). A
        wrong shape is a one-line ValueError.
        """
        z = tf.convert_to_tensor(z, tf.float32)
        expected = (*s.shape[1:3], self.latent_channels)
        if z.shape.rank != 4 or any(
            e is not None and g is not None and e != g for e, g in zip(expected, z.shape[1:])
        ):
            raise ValueError(
                f"latent group {self.index} takes z of shape (batch, {expected[0]}, "
                f"{expected[1]}, {expected[2]}), got {tuple(z.shape)}"
            )
        return self.decoder_combiner(s, z)

    def through_flow(self, z):
        """A posterior-side latent after the group's flows (itself without flows), float32."""
        return z if self.flow is None else tf.cast(self.flow(z)[0], tf.float32)

    def _prior_params(self, s):
        return _split(self.prior_head(tf.nn.elu(s)))

    def get_config(self):
        return {
            **super().get_config(),
            "index": self.index,
            "upsample": self.upsample,
            "num_cells": self.num_cells,
            "decoder_channels": self.decoder_channels,
            "encoder_channels": self.encoder_channels,
            "latent_channels": self.latent_channels,
            "num_flows": self.num_flows,
            "residual_posterior": self.residual_posterior,
            "use_se": self.use_se,
        }


def _split(params):
    """Split a (mu, log_sigma) head output along channels, in float32 for the distributions."""
    mu, log_sigma = tf.split(tf.cast(params, tf.float32), 2, axis=-1)
    return mu, log_sigma
