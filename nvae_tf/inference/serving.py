"""The exported SavedModel: five signatures that load with plain ``tf.saved_model.load``.

Signatures (every input is a named tensor; outputs are dicts):

* ``sample(num_samples: int32, temperature: float32, seed: int64)`` -> ``images``
  (N, H, W, C) in [0, 1]; colour images are decoder samples at decoder temperature 1, binary
  images Bernoulli means (as ``NVAE.sample``).
* ``reconstruct(images: float32)`` -> ``images``: one posterior sample decoded.
* ``encode(images: float32)`` -> for every latent group l (top group 0 first), each
  (B, h_l, w_l, C_z): ``mean_<l>`` and ``scale_<l>``, the posterior mean and standard
  deviation, and ``z_<l>``, the deterministic code that ``decode`` takes (the posterior mean
  after the group's flows; each group's posterior is conditioned on the codes above it).
* ``decode(z_0, ..., z_<L-1>: float32, num_kept_groups: int32, temperature: float32,
  seed: int64)`` -> ``images``: the top-down pass from the given latents, one tensor per
  group with the shapes ``encode`` returns; groups from ``num_kept_groups`` on are redrawn
  from the prior at ``temperature`` (``num_kept_groups = L`` uses them all: deterministic).
  Pixels are the decoder mean (Bernoulli mean; logistic mixture mean for colour).
* ``log_likelihood(images: float32, num_samples: int32)`` -> ``log_likelihood`` (B,) in nats
  (importance weighted, docs/design.md#evaluation) and ``bits_per_dim`` (B,), the NLL in bits
  per dimension.

``reconstruct`` and ``log_likelihood`` draw their posterior samples from a fixed seed
(``SERVING_SEED``), so the same batch always gets the same answer; ``encode`` is
deterministic; ``sample`` and ``decode`` take the seed as input. Inputs are checked in the
graph: a wrong shape, a value outside [0, 1] (binary models: not 0/1 for
``log_likelihood``), ``num_samples < 1``, ``temperature <= 0`` or ``num_kept_groups``
outside 0..L fail with an InvalidArgumentError naming the problem; a wrong dtype or latent
shape is refused by TensorFlow's signature matching, which names the expected TensorSpec.
"""

import tensorflow as tf

from nvae_tf.inference import latent_space
from nvae_tf.inference.likelihood import bits_per_dim
from nvae_tf.inference.sampling import decoder_images

SERVING_SEED = 0
SIGNATURES = ("sample", "reconstruct", "encode", "decode", "log_likelihood")

_IMAGES = tf.TensorSpec(None, tf.float32, name="images")  # any rank: checked in the graph
_COUNT = tf.TensorSpec([], tf.int32, name="num_samples")
_TEMPERATURE = tf.TensorSpec([], tf.float32, name="temperature")
_SEED = tf.TensorSpec([], tf.int64, name="seed")
_NUM_KEPT = tf.TensorSpec([], tf.int32, name="num_kept_groups")


class ServingModule(tf.Module):
    """The five signatures over a trained NVAE; ``max_images_per_pass`` bounds the IW chunks.

    The model is closed over rather than tracked as an attribute: tracking a Keras model makes
    SavedModel trace its ``call`` as a default signature, which returns a distribution. Its
    variables are tracked directly instead, so every captured one is saved.
    """

    def __init__(self, model, max_images_per_pass=256):
        super().__init__(name="nvae")
        self.model_variables = list(model.variables)
        config = model.config
        shape = [config.image_size, config.image_size, config.image_channels]

        @tf.function(input_signature=[_COUNT, _TEMPERATURE, _SEED])
        def sample(num_samples, temperature, seed):
            checks = [
                tf.debugging.assert_positive(num_samples, message="num_samples must be >= 1"),
                tf.debugging.assert_positive(temperature, message="temperature must be > 0"),
                tf.debugging.assert_all_finite(temperature, message="temperature must be finite"),
            ]
            with tf.control_dependencies(checks):
                return {"images": model.sample(num_samples, temperature, seed=seed)}

        @tf.function(input_signature=[_IMAGES])
        def reconstruct(images):
            return {"images": model.reconstruct(_checked(images, shape), seed=SERVING_SEED)}

        @tf.function(input_signature=[_IMAGES])
        def encode(images):
            out = {}
            for index, group in enumerate(latent_space.encode(model, _checked(images, shape))):
                out[f"mean_{index}"] = group.mean
                out[f"scale_{index}"] = group.stddev
                out[f"z_{index}"] = group.z
            return out

        num_groups = len(model.groups)

        @tf.function(input_signature=[*latent_specs(model), _NUM_KEPT, _TEMPERATURE, _SEED])
        def decode(*inputs):
            *latents, num_kept, temperature, seed = inputs
            checks = [
                tf.debugging.assert_non_negative(num_kept, message="num_kept_groups must be >= 0"),
                tf.debugging.assert_less_equal(
                    num_kept, num_groups, message=f"num_kept_groups must be <= {num_groups}"
                ),
                tf.debugging.assert_positive(temperature, message="temperature must be > 0"),
                *_latent_checks(latents, latent_specs(model)),
            ]
            with tf.control_dependencies(checks):
                logits, _ = latent_space.walk(model, latents, temperature, seed, None, num_kept)
            return {"images": decoder_images(model.output_distribution(logits), mean=True)}

        @tf.function(input_signature=[_IMAGES, _COUNT])
        def log_likelihood(images, num_samples):
            images = _checked(images, shape, binary=config.decoder == "bernoulli")
            with tf.control_dependencies(
                [tf.debugging.assert_positive(num_samples, message="num_samples must be >= 1")]
            ):
                ll = model.log_likelihood(
                    images, num_samples, max_images_per_pass, seed=SERVING_SEED
                )
            return {"log_likelihood": ll, "bits_per_dim": bits_per_dim(-ll, config.num_output_dims)}

        self.sample = sample
        self.reconstruct = reconstruct
        self.encode = encode
        self.decode = decode
        self.log_likelihood = log_likelihood


def latent_specs(model):
    """One input per latent group: ``z_<l>`` (batch, h_l, w_l, C_z), top group first; each
    new scale doubles the top group's size (that of the learned ``h``)."""
    height, width = model.config.h_shape[:2]
    specs = []
    for group in model.groups:
        if group.upsample:
            height, width = 2 * height, 2 * width
        shape = [None, height, width, group.latent_channels]
        specs.append(tf.TensorSpec(shape, tf.float32, name=f"z_{group.index}"))
    return specs


def _latent_checks(latents, specs):
    """In-graph shape checks of the ``decode`` inputs (a loaded signature does not check
    the non-batch dimensions of its inputs itself)."""
    checks = []
    for z, spec in zip(latents, specs):
        dims = ", ".join(str(d) for d in spec.shape[1:])
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(z)[1:],
                spec.shape[1:],
                message=f"{spec.name} must have shape (batch, {dims})",
            )
        )
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(z)[0],
                tf.shape(latents[0])[0],
                message="every z_<l> must have the same batch size",
            )
        )
    return checks


def _checked(images, shape, binary=False):
    """Check (B, *shape) with B >= 1, finite values in [0, 1] and, if ``binary``, values 0 or 1.

    All conditions are computed without ops that could fail on a bad input and feed one
    Assert that reports the first failing one, so the message does not depend on op order.
    """
    dims = tf.shape(images)
    flat = tf.reshape(images, [-1])  # reductions over a flat vector work for any rank
    padded = tf.pad(dims, [[0, 4]])[1:4]  # defined for every rank
    conditions = [
        (
            tf.logical_and(tf.equal(tf.size(dims), 4), tf.reduce_all(tf.equal(padded, shape))),
            f"images must have shape (batch, {shape[0]}, {shape[1]}, {shape[2]})",
        ),
        (tf.pad(dims, [[0, 1]])[0] > 0, "images is an empty batch: send at least one image"),
        (tf.reduce_all(tf.math.is_finite(flat)), "images contain NaN or Inf"),
        (tf.reduce_all((flat >= 0.0) & (flat <= 1.0)), "images must be in [0, 1]"),
    ]
    if binary:
        conditions.append(
            (
                tf.reduce_all((flat == 0.0) | (flat == 1.0)),
                (
                    "this model scores binary images: pixels must be 0 or 1 (binarize "
                    "first, e.g. images > 0.5)"
                ),
            )
        )
    ok = tf.stack([c for c, _ in conditions])
    message = tf.gather(tf.constant([m for _, m in conditions]), tf.argmin(tf.cast(ok, tf.int32)))
    check = tf.debugging.Assert(tf.reduce_all(ok), [message, "; got shape", dims], summarize=8)
    with tf.control_dependencies([check]):
        return tf.ensure_shape(tf.identity(images), [None, *shape])


def export(model, path, max_images_per_pass=256):
    """Write ``model`` as a SavedModel with the signatures of this module's docstring."""
    module = ServingModule(model, max_images_per_pass)
    signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
    tf.saved_model.save(module, path, signatures=signatures)
    return path
