"""The NVAE model (paper §2-3): bottom-up encoder, top-down hierarchy of latent groups, decoder.

Forward pass, top-down once (docs/design.md#forward-pass)::

    x -> 2x-1 -> stem -> pre-process cells -> encoder blocks (one feature per latent group)
    s = h (learned)
    for each group, top first: decoder cells -> prior & posterior -> z -> combine z into s
    s -> post-process cells -> ELU -> output conv -> decoder distribution p(x | z)
"""

from collections.abc import Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from nvae_tf import graph_optimization
from nvae_tf.config import CHANNEL_MULT, NVAEConfig
from nvae_tf.distributions import CroppedBernoulli, DiscretizedLogisticMixture
from nvae_tf.inference import latent_space
from nvae_tf.inference.likelihood import bits_per_dim, importance_weighted
from nvae_tf.inference.sampling import decoder_images, fold_seed, prior_images
from nvae_tf.layers.cells import DecoderCell, EncoderCell
from nvae_tf.layers.latent_group import LatentGroup
from nvae_tf.layers.normalization import BatchNorm
from nvae_tf.layers.recompute import recompute_cells, run_cells
from nvae_tf.layers.tracking import CheckpointListsMixin
from nvae_tf.layers.weight_norm import Conv2D
from nvae_tf.output import NVAEOutput
from nvae_tf.training.guarded_optimizer import make_optimizer
from nvae_tf.training.objective import LossTerms, Objective
from nvae_tf.training.regularizers import SpectralRegularizer
from nvae_tf.training.train_step import run_train_step

tfd = tfp.distributions
# A stateless seed: shape (2,) integers (or one integer), or None for the model's generator.
Seed = tf.Tensor | Sequence[int] | int | None

# What train_step reports (epoch means): the objective's terms, bits/dim and the gradient norm.
# Checkpointed with the run (--resume): a new name here fails resuming older runs. Not
# loss_but_spectral: a part of loss, apart only for the order of its gradients.
TRAIN_METRICS = (*(f for f in LossTerms._fields if f != "loss_but_spectral"), "bpd", "grad_norm")
# A latent channel is "active" when its KL, summed over space, exceeds this (nats; the
# original's threshold in its per-channel KL diagnostics; paper §4.3, footnote 5).
ACTIVE_KL_THRESHOLD = 0.1
MNIST_CROP = 2  # 28x28 digits padded to 32x32; the likelihood is scored on the 28x28 crop


@keras.saving.register_keras_serializable(package="nvae_tf")
class NVAE(CheckpointListsMixin, keras.Model):
    """Nouveau VAE. ``NVAE(config)`` builds every variable at construction (batch of one)."""

    def __init__(self, config: NVAEConfig | dict, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = NVAEConfig.from_dict(config)
        self.config = c = config
        self.stem = Conv2D(c.num_channels_enc, 3, name="stem")
        self.preprocess = [
            EncoderCell(
                downsample=j == c.num_preprocess_cells - 1, use_se=c.use_se, name=f"pre_{b}_{j}"
            )
            for b in range(c.num_preprocess_blocks)
            for j in range(c.num_preprocess_cells)
        ]
        self.encoder_cells, self._encoder_block_ends = self._make_encoder_tower()
        self.groups = self._make_latent_groups()
        self.postprocess = [
            DecoderCell(3, upsample=j == 0, use_se=c.use_se, name=f"post_{b}_{j}")
            for b in range(c.num_postprocess_blocks)
            for j in range(c.num_postprocess_cells)
        ]
        self.output_conv = Conv2D(c.decoder_channels, 3, name="output_conv")
        self.h = self.add_weight(
            name="h", shape=c.h_shape, initializer=keras.initializers.RandomUniform(0.0, 1.0)
        )
        self.spectral_regularizer = SpectralRegularizer(
            c.num_power_iter, reuse_forward_kernels=c.recompute == "none", name="spectral"
        )
        self._trackers = {name: keras.metrics.Mean(name=name) for name in TRAIN_METRICS}
        self.objective = None  # set by compile()
        # All sampling noise comes from this generator (checkpointed: exact resume); inside a
        # distribution strategy's scope each replica gets its own stream.
        self.noise = tf.random.Generator.from_seed(c.seed)
        self.build((None, c.image_size, c.image_size, c.image_channels))

    # --- construction -------------------------------------------------------------------------
    def _scale_channels(self, base, scale):
        """Width at latent ``scale`` (0 = top) for a tower of base width ``base``."""
        c = self.config
        return base * CHANNEL_MULT ** (c.num_preprocess_blocks + c.num_latent_scales - 1 - scale)

    def _make_encoder_tower(self):
        """Cells in bottom-up order, and the index after which each group's feature is taken."""
        c, cells, ends = self.config, [], []
        for scale, groups in enumerate(reversed(c.groups_per_scale)):
            for g in range(groups):
                if scale > 0 and g == 0:
                    cells.append(
                        EncoderCell(downsample=True, use_se=c.use_se, name=f"enc_down_{scale}")
                    )
                cells += [
                    EncoderCell(use_se=c.use_se, name=f"enc_{scale}_{g}_{i}")
                    for i in range(c.num_cell_per_cond_enc)
                ]
                ends.append(len(cells))
        return cells, ends

    def _make_latent_groups(self):
        c, groups = self.config, []
        for scale, count in enumerate(c.groups_per_scale):
            for g in range(count):
                index = len(groups)
                groups.append(
                    LatentGroup(
                        index=index,
                        upsample=scale > 0 and g == 0,
                        num_cells=0 if index == 0 else c.num_cell_per_cond_dec,
                        decoder_channels=self._scale_channels(c.num_channels_dec, scale),
                        encoder_channels=self._scale_channels(c.num_channels_enc, scale),
                        latent_channels=c.num_latent_per_group,
                        num_flows=c.num_nf,
                        residual_posterior=c.res_dist,
                        use_se=c.use_se,
                        name=f"group_{index}",
                    )
                )
        return groups

    def build(self, input_shape):
        if not self.built:
            self.call(tf.zeros((1, *input_shape[1:])), training=False)
            self.spectral_regularizer.build_for(self.conv_layers())
        super().build(input_shape)

    # --- forward ------------------------------------------------------------------------------
    def __call__(self, x, *args, **kwargs):
        # Validate before Keras wraps call() errors in a multi-line report.
        return super().__call__(self.check_images(x), *args, **kwargs)

    def call(self, x: tf.Tensor, training: bool | None = None, seed: Seed = None) -> NVAEOutput:
        """Posterior pass on images ``x`` in [0, 1], shape (B, H, W, C).

        Returns an ``NVAEOutput``. ``seed`` (shape (2,) int) makes the posterior samples
        reproducible; by default they come from the model's generator.
        """
        x = self.check_images(x)
        return self.top_down(self.bottom_up(x, training), training, seed)

    def bottom_up(self, x, training=False):
        """Encoder features, one per latent group, bottom-up order (last = final feature)."""
        s = self.stem(tf.cast(2.0 * x - 1.0, self.compute_dtype))
        s = self._run(self.preprocess, s, training)
        features, start = [], 0
        for end in self._encoder_block_ends:
            s = self._run(self.encoder_cells[start:end], s, training)
            features.append(s)
            start = end
        return features

    def top_down(
        self, features: list[tf.Tensor], training: bool | None = None, seed: Seed = None
    ) -> NVAEOutput:
        """The posterior's top-down pass given the encoder ``features`` of ``bottom_up``.

        Separate from ``call`` so that K posterior samples of an image can share one encoder
        pass (the encoder is deterministic): importance-weighted evaluation tiles the features.
        """
        seed = self.stateless_seed(seed)
        s = self.initial_state(tf.shape(features[0])[0])
        groups = []
        for group in self.groups:
            s = self._run(group.cells, s, training)
            s, group_output = group(
                s, features[-1 - group.index], fold_seed(seed, group.index), training=training
            )
            groups.append(group_output)
        logits = self.output_logits(s, training)
        return NVAEOutput(
            output_distribution=self.output_distribution(logits),
            logits=logits,
            kl=tf.stack([g.kl for g in groups], axis=1),
            log_q=tf.add_n([g.log_q for g in groups]),
            log_p=tf.add_n([g.log_p for g in groups]),
            kl_per_channel=tf.stack([g.kl_per_channel for g in groups]),
            posterior_mean=[g.posterior_mean for g in groups],
            posterior_stddev=[g.posterior_stddev for g in groups],
        )

    def initial_state(self, batch_size):
        """The top-down state before the top group: the learned ``h`` for every image."""
        h = tf.cast(self.h, self.compute_dtype)[None]
        return tf.tile(h, [batch_size, 1, 1, 1])

    def output_logits(self, s, training=False):
        """Parameters of p(x | z) from the top-down state after the last group."""
        s = self._run(self.postprocess, s, training)
        return tf.cast(self.output_conv(tf.nn.elu(s)), tf.float32)

    def _run(self, cells, x, training):
        """Run a cell stack, recomputing activations in the backward pass if configured."""
        mode = self.config.recompute
        if mode == "none" or not training or not cells:
            return run_cells(cells, x, training=training)
        if mode == "group":
            return recompute_cells(cells, x, training=training)
        for cell in cells:
            x = recompute_cells([cell], x, training=training)
        return x

    # --- decoder distribution -----------------------------------------------------------------
    def output_distribution(self, logits: tf.Tensor, temperature: float = 1.0) -> tfd.Distribution:
        """p(x | z) with a per-image ``log_prob`` (summed over pixels and channels)."""
        c = self.config
        if c.decoder == "bernoulli":
            return CroppedBernoulli(logits, crop=MNIST_CROP if c.is_mnist else 0)
        mixture = DiscretizedLogisticMixture(
            logits,
            num_bits=c.num_x_bits,
            temperature=temperature,
            original_edge=c.original_dml_edge,
        )
        return tfd.Independent(mixture, reinterpreted_batch_ndims=2)

    # --- generation and inference -------------------------------------------------------------
    def prior_output_distribution(
        self,
        num_samples: int,
        temperature: float = 1.0,
        decoder_temperature: float = 1.0,
        training: bool = False,
        seed: Seed = None,
        num_fixed_groups: int = 0,
        fixed_seed: Seed = None,
    ) -> tfd.Distribution:
        """Walk the prior at latent ``temperature``; returns p(x | z) of the samples.

        ``training=True`` runs batch norm in training mode (BN re-adjustment, paper §4.2).
        The first ``num_fixed_groups`` groups draw their z from ``fixed_seed`` instead of
        ``seed``: calls that share ``fixed_seed`` and ``num_samples`` share those z sample by
        sample while the lower groups vary with ``seed`` (paper Fig. 12).
        """
        seed = self.stateless_seed(seed)
        fixed_seed = self.stateless_seed(fixed_seed) if num_fixed_groups else seed
        s = self.initial_state(num_samples)
        for group in self.groups:
            s = run_cells(group.cells, s, training=training)
            group_seed = fixed_seed if group.index < num_fixed_groups else seed
            s = group.sample(s, fold_seed(group_seed, group.index), temperature)
        return self.output_distribution(self.output_logits(s, training), decoder_temperature)

    def sample(
        self,
        num_samples: int,
        temperature: float = 1.0,
        decoder_temperature: float = 1.0,
        training: bool = False,
        seed: Seed = None,
    ) -> tf.Tensor:
        """Images in [0, 1]: Bernoulli means for binary data, mixture samples for colour."""
        return prior_images(
            self, num_samples, temperature, decoder_temperature, training=training, seed=seed
        )

    def encode(
        self, x: tf.Tensor, sample: bool = False, seed: Seed = None
    ) -> list[latent_space.GroupLatent]:
        """Per group, top first: posterior mean, stddev and latent z (``latent_space.encode``)."""
        return latent_space.encode(self, x, sample, seed)

    def decode(
        self,
        latents: list,
        temperature: float = 1.0,
        seed: Seed = None,
        num_samples: int | None = None,
    ) -> tf.Tensor:
        """Images from given z, other groups from the prior (``latent_space.decode``)."""
        return latent_space.decode(self, latents, temperature, seed, num_samples)

    def interpolate(self, x_a: tf.Tensor, x_b: tf.Tensor, num_steps: int = 8) -> tf.Tensor:
        """Decoded path between two images' latents (``latent_space.interpolate``)."""
        return latent_space.interpolate(self, x_a, x_b, num_steps)

    def reconstruct(self, x: tf.Tensor, seed: Seed = None) -> tf.Tensor:
        """Decode the posterior sample of ``x`` (Bernoulli means / mixture samples)."""
        seed = self.stateless_seed(seed)
        out = self(x, training=False, seed=seed)
        return decoder_images(out.output_distribution, seed=fold_seed(seed, -1))

    def stateless_seed(self, seed: Seed = None) -> tf.Tensor:
        """A stateless seed: the given one, or the next from the model's generator."""
        if seed is None:
            return self.noise.make_seeds(1)[:, 0]
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)  # int32 tensors too
        return seed if seed.shape.rank == 1 else tf.stack([seed, tf.zeros_like(seed)])

    @graph_optimization.function(reduce_retracing=True, cache_graph=True)
    def log_likelihood(
        self,
        x: tf.Tensor,
        num_samples: int = 1000,
        max_images_per_pass: int = 256,
        seed: Seed = None,
    ) -> tf.Tensor:
        """Importance-weighted log p(x) per image in nats, from ``num_samples`` samples."""
        return importance_weighted(self, x, num_samples, max_images_per_pass, seed)[0]

    @graph_optimization.function(reduce_retracing=True)
    def elbo(self, x: tf.Tensor, num_samples: int = 1, seed: Seed = None) -> tf.Tensor:
        """Evidence lower bound per image in nats, averaged over ``num_samples`` samples."""
        return importance_weighted(self, x, num_samples, seed=seed)[1]

    def check_images(self, x: tf.Tensor) -> tf.Tensor:
        """Validate an image batch against the config; one-line ValueError otherwise."""
        c = self.config
        x = tf.convert_to_tensor(x)
        expected = (c.image_size, c.image_size, c.image_channels)
        if x.shape.rank != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) for this config, got {tuple(x.shape)}"
            )
        if not x.dtype.is_floating:
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype.name}")
        return x

    # --- training (docs/design.md#objective) ----------------------------------------------------
    def compile(
        self, steps_per_epoch: int, optimizer: keras.optimizers.Optimizer | None = None, **kwargs
    ) -> None:
        """Prepare ``fit``: NVAE's guarded Adamax + schedule unless ``optimizer`` is given.

        ``steps_per_epoch`` (per replica, as the original's loader length) sets the length of
        the learning-rate and KL warm-up schedules: ``epochs * steps_per_epoch`` steps in all.
        """
        if optimizer is None:
            optimizer = make_optimizer(self.config, steps_per_epoch)
        super().compile(optimizer=optimizer, **kwargs)
        self.objective = Objective(self.config, self.config.epochs * steps_per_epoch)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def train_step(self, data):
        return run_train_step(self, _images_of(data))

    def test_step(self, data):
        x = _images_of(data)
        out = self(x, training=False)
        nelbo = tf.reduce_mean(out.negative_elbo(x))
        return self._update_metrics(
            {"nelbo": nelbo, "bpd": bits_per_dim(nelbo, self.config.num_output_dims)}
        )

    def _update_metrics(self, terms, **extra):
        for name, value in terms.items():
            if name in self._trackers:
                self._trackers[name].update_state(value)
        logs = {name: self._trackers[name].result() for name in terms if name in self._trackers}
        return {**logs, **extra}

    # --- parts used by the regularizers ---------------------------------------------------------
    def conv_layers(self):
        """Every conv (the spectral regularizer's set, docs/design.md#spectral-regularization)."""
        return [layer for layer in self._flatten_layers() if isinstance(layer, Conv2D)]

    def batchnorm_layers(self):
        return [layer for layer in self._flatten_layers() if isinstance(layer, BatchNorm)]

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(NVAEConfig.from_dict(config.pop("config")), **config)


def _images_of(data):
    """``fit`` may hand over images alone or (images, labels)."""
    return data[0] if isinstance(data, (tuple, list)) else data
