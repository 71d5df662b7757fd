"""What one posterior pass of the model returns: the typed ``NVAEOutput``."""

from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


class NVAEOutput(NamedTuple):
    """One posterior pass of the model (``NVAE.__call__``); per-image values are in nats.

    A NamedTuple so that ``tf.function`` and ``tf.distribute`` can return it.
    """

    output_distribution: tfd.Distribution  # p(x | z); ``log_prob(x)`` is per image, (B,)
    logits: tf.Tensor  # its raw parameters (B, H, W, P)
    kl: tf.Tensor  # KL(q || p) per image and group, top group first (B, groups)
    log_q: tf.Tensor  # log q(z | x) summed over groups (B,)
    log_p: tf.Tensor  # log p(z) summed over groups (B,)
    kl_per_channel: tf.Tensor  # KL per group and latent channel, batch mean (groups, C_z)
    posterior_mean: list  # per group (B, h, w, C_z), top group first
    posterior_stddev: list

    def reconstruction(self, x: tf.Tensor) -> tf.Tensor:
        """-log p(x | z) per image (B,)."""
        return -self.output_distribution.log_prob(x)

    def negative_elbo(self, x: tf.Tensor) -> tf.Tensor:
        """The per-image negative ELBO -log p(x | z) + sum_l KL_l (B,): what NVAE minimises."""
        return self.reconstruction(x) + tf.reduce_sum(self.kl, axis=1)

    def log_weight(self, x: tf.Tensor) -> tf.Tensor:
        """log p(x, z) - log q(z | x) per image (B,): one importance weight."""
        return -self.reconstruction(x) + self.log_p - self.log_q
