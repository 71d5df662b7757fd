"""Proof that an imported model computes the original's numbers: zero-noise reference checks.

With every latent sample's noise set to zero (each group's z is its distribution's mean, then
the flows), a posterior pass and a prior walk are deterministic, so the imported model must
reproduce what the original code computed the same way, in inference mode (batch-norm
running statistics). The reference is an ``.npz`` with:

  images (B, H, W, C) in [0, 1]; recon_nats (B,) = -log p(images | z) (MNIST on the 28x28
  crop); kl (B, groups), top group first (with flows: log q - log p at z); log_q, log_p (B,);
  sample_temperature; sample_images; sample_nats (B,) = -log p(sample_images | z) where z
  walks the prior's means at that temperature.

A value passes when it is within max(1e-4 x |reference|, 1e-2 nats) of the reference.
"""

import contextlib
import dataclasses

import numpy as np

REL_TOLERANCE = 1e-4
ABS_TOLERANCE = 1e-2  # nats
INPUT_KEYS = ("images", "sample_temperature", "sample_images")
COMPARED_KEYS = ("recon_nats", "kl", "log_q", "log_p", "sample_nats")


class VerificationError(ValueError):
    """A reference file that cannot be used (one-line message)."""


@dataclasses.dataclass(frozen=True)
class KeyDifference:
    """Largest differences of one compared key: absolute, and relative to |reference|."""

    key: str
    max_abs: float
    max_rel: float
    ok: bool

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"{self.key:<12} max abs {self.max_abs:.3g}  max rel {self.max_rel:.3g}  {verdict}"


@dataclasses.dataclass(frozen=True)
class VerificationReport:
    differences: tuple

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.differences)


@contextlib.contextmanager
def zero_latent_noise(model):
    """Within this block every latent group of ``model`` uses its distribution's mean as z."""
    previous = [group.use_mean for group in model.groups]
    for group in model.groups:
        group.use_mean = True
    try:
        yield model
    finally:
        for group, value in zip(model.groups, previous):
            group.use_mean = value


def zero_noise_outputs(model, images, sample_images, temperature) -> dict:
    """The compared quantities of ``model`` at zero latent noise, as numpy arrays."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    sample_images = tf.convert_to_tensor(sample_images, tf.float32)
    with zero_latent_noise(model):
        out = model(images, training=False)
        prior_path = model.prior_output_distribution(
            int(sample_images.shape[0]), temperature=float(temperature), training=False
        )
    return {
        "recon_nats": out.reconstruction(images).numpy(),
        "kl": out.kl.numpy(),
        "log_q": out.log_q.numpy(),
        "log_p": out.log_p.numpy(),
        "sample_nats": -prior_path.log_prob(sample_images).numpy(),
    }


def load_reference(path) -> dict:
    """Read a reference ``.npz`` (plain arrays only: pickled objects are refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            reference = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise VerificationError(f"reference file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise VerificationError(f"cannot read reference {path}: {str(e).splitlines()[0]}") from None
    missing = [k for k in INPUT_KEYS + COMPARED_KEYS if k not in reference]
    if missing:
        raise VerificationError(f"reference {path} lacks {', '.join(missing)}")
    return reference


def compare(ours: dict, reference: dict) -> VerificationReport:
    """Largest absolute and relative difference per key, each checked against the tolerance."""
    differences = []
    for key in COMPARED_KEYS:
        mine = np.asarray(ours[key], np.float64)
        theirs = np.asarray(reference[key], np.float64)
        if mine.shape != theirs.shape:
            raise VerificationError(
                f"reference {key} has shape {theirs.shape}, the model gives {mine.shape} "
                "(a reference for another layout?)"
            )
        gap = np.abs(mine - theirs)
        allowed = np.maximum(REL_TOLERANCE * np.abs(theirs), ABS_TOLERANCE)
        relative = gap / np.maximum(np.abs(theirs), np.finfo(np.float32).tiny)
        differences.append(
            KeyDifference(
                key,
                float(gap.max(initial=0.0)),
                float(relative.max(initial=0.0)),
                bool(np.all(gap <= allowed)),
            )
        )
    return VerificationReport(tuple(differences))


def verify(model, reference_path) -> VerificationReport:
    """Run ``model`` at zero latent noise on the reference's inputs and compare."""
    reference = load_reference(reference_path)
    shape = tuple(model.config.image_size for _ in range(2)) + (model.config.image_channels,)
    for key in ("images", "sample_images"):
        if reference[key].ndim != 4 or tuple(reference[key].shape[1:]) != shape:
            raise VerificationError(
                f"reference {key} has shape {reference[key].shape}; this model takes "
                f"(B, {', '.join(map(str, shape))})"
            )
    ours = zero_noise_outputs(
        model, reference["images"], reference["sample_images"], reference["sample_temperature"]
    )
    return compare(ours, reference)
