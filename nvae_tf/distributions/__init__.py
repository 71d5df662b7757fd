"""Output and latent distributions of NVAE (paper §3.2, App. A; docs/design.md#architecture)."""

from nvae_tf.distributions.bernoulli import CroppedBernoulli
from nvae_tf.distributions.latent_normal import (
    latent_normal,
    residual_normal,
    soft_clamp,
    top_prior,
)
from nvae_tf.distributions.logistic_mixture import DiscretizedLogisticMixture

__all__ = [
    "CroppedBernoulli",
    "DiscretizedLogisticMixture",
    "latent_normal",
    "residual_normal",
    "soft_clamp",
    "top_prior",
]
