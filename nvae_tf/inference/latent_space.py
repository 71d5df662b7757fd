"""Working in latent space: encode images to per-group latents, decode given latents, and
interpolate or traverse between them (``NVAE.encode`` / ``decode`` / ``interpolate``).

A model's latents are one tensor per group, top (lowest resolution) group first, each
(B, h_l, w_l, C_z). ``z`` always means what the decoder combiner of its group consumes: with
flows (``num_nf > 0``) the post-flow latent, so ``decode(encode(x))`` needs no flow at all.

Decoded images are deterministic given every z: the Bernoulli mean for binary data and, for
colour images, the logistic mixture's mean (the mixture-weighted average of the component
means and RGB coefficients, then the channel autoregression), the image the original feeds to
FID. Groups left out are drawn from their prior at ``temperature``, conditioned on the groups
above them, so ``decode(encode(x)[:k])`` keeps the top k groups of x and redraws the rest.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from nvae_tf.inference.sampling import decoder_images, fold_seed
from nvae_tf.layers.recompute import run_cells


class GroupLatent(NamedTuple):
    """One latent group of an encoded batch, each (B, h, w, C_z)."""

    mean: tf.Tensor  # posterior mean (before flows)
    stddev: tf.Tensor  # posterior standard deviation (before flows)
    z: tf.Tensor  # the latent decode() takes: the mean or a posterior sample, after flows


def encode(model, x: tf.Tensor, sample: bool = False, seed=None) -> list[GroupLatent]:
    """Per-group posteriors of images ``x``, top group first, as a list of ``GroupLatent``.

    One top-down pass in which every group's z is its posterior mean (``sample=False``, a
    deterministic code) or a posterior sample (``sample=True``, from ``seed``: the same z as
    ``model(x, seed=seed)``). Lower groups' posteriors are conditioned on those z.
    """
    x = model.check_images(x)
    seed = model.stateless_seed(seed) if sample else None
    features = model.bottom_up(x)
    s = model.initial_state(tf.shape(x)[0])
    latents = []
    for group in model.groups:
        s = run_cells(group.cells, s, training=False)
        q, _ = group.posterior(s, features[-1 - group.index])
        z = q.sample(seed=fold_seed(seed, group.index)) if sample else q.mean()
        z = group.through_flow(z)
        latents.append(GroupLatent(q.mean(), q.stddev(), z))
        s = group.combine(s, z)
    return latents


def walk(
    model, latents: list, temperature: float = 1.0, seed=None, num_samples=None, num_kept=None
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The top-down pass from given latents; returns (logits, the z of every group).

    ``latents``: per group from the top, a z tensor, a ``GroupLatent`` or None; groups that
    are None or beyond the list are drawn from the prior at ``temperature`` with ``seed``
    (group l from ``fold_in(seed, l)``, as ``NVAE.sample``). ``num_samples`` is needed only
    when no z is given. ``num_kept`` (a tensor, for graphs): only the first ``num_kept``
    given groups are used, the others are drawn from the prior too.
    """
    latents = [getattr(z, "z", z) for z in latents]
    if len(latents) > len(model.groups):
        raise ValueError(f"this model has {len(model.groups)} latent groups, got {len(latents)}")
    given = [z for z in latents if z is not None]
    if num_samples is None:
        if not given:
            raise ValueError("decode: give at least one group's z or num_samples")
        num_samples = tf.shape(given[0])[0]
    seed = model.stateless_seed(seed)
    latents = latents + [None] * (len(model.groups) - len(latents))
    s = model.initial_state(num_samples)
    walked = []
    for group, z in zip(model.groups, latents):
        s = run_cells(group.cells, s, training=False)
        if z is None or num_kept is not None:
            drawn = group.prior(s, temperature).sample(seed=fold_seed(seed, group.index))
            z = drawn if z is None else tf.where(group.index < num_kept, z, drawn)
        s = group.combine(s, z)
        walked.append(tf.convert_to_tensor(z, tf.float32))
    return model.output_logits(s), walked


def decode(
    model, latents: list, temperature: float = 1.0, seed=None, num_samples=None
) -> tf.Tensor:
    """Images (B, H, W, C) in [0, 1] from per-group latents (see ``walk``): the decoder mean."""
    logits, _ = walk(model, latents, temperature, seed, num_samples)
    return decoder_images(model.output_distribution(logits), mean=True)


def prior_latents(model, num_samples: int, temperature: float = 1.0, seed=None) -> list[tf.Tensor]:
    """Every group's z of ``num_samples`` prior samples; ``decode`` of them equals
    ``NVAE.sample`` with the same seed for binary data (the decoder mean for colour)."""
    return walk(model, [], temperature, seed, num_samples)[1]


def interpolate(model, x_a: tf.Tensor, x_b: tf.Tensor, num_steps: int = 8) -> tf.Tensor:
    """Decoded images on the path from ``x_a`` to ``x_b`` (single images or batches of the
    same size): (num_steps, H, W, C) for single images, else (B, num_steps, H, W, C).

    Linear in every group's deterministic code z (posterior mean, after flows), with the
    same weight for all groups: the ends are exactly the two images' deterministic
    reconstructions, and the codes are posterior means rather than draws from a standard
    normal, so the norm argument for spherical interpolation does not apply to them.
    """
    if num_steps < 2:
        raise ValueError(f"interpolation needs at least 2 steps, got {num_steps}")
    single = tf.convert_to_tensor(x_a).shape.rank == 3
    x_a, x_b = (tf.convert_to_tensor(x)[None] if single else x for x in (x_a, x_b))
    a, b = encode(model, x_a), encode(model, x_b)
    weights = tf.constant(np.linspace(0.0, 1.0, num_steps), tf.float32)[:, None, None, None, None]
    path = [
        tf.reshape((1.0 - weights) * za.z[None] + weights * zb.z[None], [-1, *za.z.shape[1:]])
        for za, zb in zip(a, b)
    ]  # (steps * B, h, w, C_z) per group, step-major
    images = decode(model, path)
    images = tf.reshape(images, [num_steps, -1, *images.shape[1:]])
    images = tf.transpose(images, [1, 0, 2, 3, 4])
    return images[0] if single else images


def traverse(
    model, latents: list, group: int, num_values: int = 8, temperature: float = 1.0, seed=None
) -> tf.Tensor:
    """Vary latent ``group`` while holding every other group's z: (B, num_values, H, W, C).

    Column 0 decodes ``latents`` as given; each further column redraws the group's z from
    its prior at ``temperature`` (conditioned on the groups above it); the groups below keep
    their z, so what changes is the group's own contribution.
    """
    latents = [getattr(z, "z", z) for z in latents]
    if not 0 <= group < len(model.groups):
        raise ValueError(f"group must be in 0..{len(model.groups) - 1}, got {group}")
    if len(latents) != len(model.groups) or any(z is None for z in latents):
        raise ValueError("traverse needs the z of every group")
    seed = model.stateless_seed(seed)
    columns = [decode(model, latents)]
    for value in range(1, num_values):
        varied = [None if index == group else z for index, z in enumerate(latents)]
        columns.append(decode(model, varied, temperature, fold_seed(seed, value)))
    return tf.stack(columns, axis=1)
