"""NVAE's training objective: per-image sums, KL warm-up and balancing, SR + BN.

``loss = mean_b(recon_b + balanced_KL_b) + lambda * (spectral_sum + bn_max_gamma_sum)``, with
``beta`` the KL warm-up coefficient and ``lambda`` fixed or annealed with ``beta``; see
docs/design.md#objective.
"""

from typing import NamedTuple

import tensorflow as tf

from nvae_tf.training.kl_balancing import balance_coefficients, balanced_kl
from nvae_tf.training.regularizers import batchnorm_penalty
from nvae_tf.training.schedules import kl_coefficient, regularizer_weight


class LossTerms(NamedTuple):
    """The scalars of one training step (batch means of per-image values, in nats)."""

    loss: tf.Tensor  # what is minimised: balanced, beta-weighted KL and the regularizers
    loss_but_spectral: tf.Tensor  # loss - reg_weight * spectral, differentiated separately
    nelbo: tf.Tensor  # the unweighted negative ELBO
    recon: tf.Tensor
    kl: tf.Tensor
    beta: tf.Tensor
    reg_weight: tf.Tensor  # lambda
    spectral: tf.Tensor
    bn_penalty: tf.Tensor


class Objective:
    """Computes the loss terms of one training step from the model's forward outputs.

    Args:
      config: the ``NVAEConfig``.
      total_steps: optimizer steps of the whole run (the KL warm-up spans a portion of it).
    """

    def __init__(self, config, total_steps):
        self.config = config
        self.total_steps = int(total_steps)
        self.alpha = balance_coefficients(config.groups_per_scale) if config.kl_balance else None

    def __call__(self, model, outputs, x, step):
        c = self.config
        recon = outputs.reconstruction(x)
        kl = outputs.kl
        beta = kl_coefficient(
            step, self.total_steps, c.kl_anneal_portion, c.kl_const_portion, c.kl_const_coeff
        )
        reg_weight = regularizer_weight(
            beta, c.weight_decay_norm, c.weight_decay_norm_anneal, c.weight_decay_norm_init
        )
        spectral = model.spectral_regularizer() if c.weight_decay_norm > 0 else tf.zeros([])
        bn = (
            batchnorm_penalty(model.batchnorm_layers()) if c.weight_decay_norm > 0 else tf.zeros([])
        )
        rest = tf.reduce_mean(recon + balanced_kl(kl, beta, self.alpha)) + reg_weight * bn
        return LossTerms(
            loss=rest + reg_weight * spectral,
            loss_but_spectral=rest,
            nelbo=tf.reduce_mean(outputs.negative_elbo(x)),  # shares recon's log_prob in graphs
            recon=tf.reduce_mean(recon),
            kl=tf.reduce_mean(tf.reduce_sum(kl, axis=1)),
            beta=tf.cast(beta, tf.float32),
            reg_weight=tf.cast(reg_weight, tf.float32),
            spectral=spectral,
            bn_penalty=bn,
        )
