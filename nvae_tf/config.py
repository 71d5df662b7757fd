"""The one typed configuration of an NVAE run: architecture, training, data.

``NVAEConfig`` is a flat frozen dataclass so that every field can be set from YAML, from
``--set key=value`` and from a tuner with the same names. Field names and defaults are the
original implementation's flags (docs/design.md#config-fields); ``configs/*.yaml`` hold the paper
runs (docs/design.md#paper-configs). The derived layout (groups per scale, channels, spatial
sizes; docs/design.md#layout-rules) lives here too, since every tool needs it.
"""

import dataclasses
import math
import typing
from collections.abc import Iterable

import yaml

from nvae_tf.files import write_atomically

DATASETS = {
    # name: (image_size, channels, num_x_bits, decoder)
    "mnist": (32, 1, 1, "bernoulli"),
    "bundled_mnist": (32, 1, 1, "bernoulli"),
    "cifar10": (32, 3, 8, "logistic_mixture"),
    "imagenet32": (32, 3, 8, "logistic_mixture"),
    "celeba64": (64, 3, 8, "logistic_mixture"),
    "celebahq256": (256, 3, 5, "logistic_mixture"),
    "ffhq256": (256, 3, 5, "logistic_mixture"),
}
CUSTOM_DATASETS = ("folder", "tfrecord")
DECODERS = ("bernoulli", "logistic_mixture")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
RECOMPUTE = ("none", "cell", "group")
CHANNEL_MULT = 2
# The fields that decide the model's variables: a checkpoint fits a model iff these agree.
ARCHITECTURE_FIELDS = (
    "image_size",
    "image_channels",
    "decoder",
    "num_channels_enc",
    "num_channels_dec",
    "num_preprocess_blocks",
    "num_preprocess_cells",
    "num_postprocess_blocks",
    "num_postprocess_cells",
    "num_cell_per_cond_enc",
    "num_cell_per_cond_dec",
    "num_latent_scales",
    "num_groups_per_scale",
    "ada_groups",
    "min_groups_per_scale",
    "num_latent_per_group",
    "num_nf",
    "num_mixture_dec",
    "use_se",
    "res_dist",
)


class ConfigError(ValueError):
    """A configuration that cannot describe a valid NVAE run (message is one line)."""


@dataclasses.dataclass(frozen=True)
class NVAEConfig:
    # --- data --------------------------------------------------------------------------------
    dataset: str = "bundled_mnist"
    data_dir: str | None = None
    image_size: int = 32
    image_channels: int = 1
    num_x_bits: int = 1  # 1 = binarized (Bernoulli decoder); 8 or 5 for colour sets
    random_flip: bool = (
        True  # random horizontal flips of training images (never MNIST), as the original
    )
    test_fraction: float = (
        0.1  # share held out of a folder/TFRecord set that has no train/test sub-folders
    )
    skip_bad_files: bool = (
        False  # skip (and count) unreadable or mis-shaped images instead of failing
    )
    deterministic_data: bool = (
        True  # fixed element order, so a checkpointed data iterator resumes exactly
    )
    shuffle_buffer: int = (
        10000  # streamed sets (TFDS, TFRecord); in-memory sets and folders shuffle fully
    )
    # --- architecture (docs/design.md#config-fields) ----------------------------------------
    num_channels_enc: int = 32
    num_channels_dec: int = 32
    num_preprocess_blocks: int = 2
    num_preprocess_cells: int = 3
    num_postprocess_blocks: int = 2
    num_postprocess_cells: int = 3
    num_cell_per_cond_enc: int = 1
    num_cell_per_cond_dec: int = 1
    num_latent_scales: int = 1
    num_groups_per_scale: int = 10
    ada_groups: bool = False
    min_groups_per_scale: int = 1
    num_latent_per_group: int = 20
    num_nf: int = 0
    num_mixture_dec: int = 10
    use_se: bool = True
    res_dist: bool = True
    decoder: str = "bernoulli"
    original_dml_edge: bool = False  # compat: 0.99 top edge, docs/design.md#dml-top-edge
    # --- training (docs/design.md#objective) --------------------------------------------------
    epochs: int = 400
    batch_size: int = 200  # per replica, as in the paper
    learning_rate: float = 1e-2
    learning_rate_min: float = 1e-4
    warmup_epochs: int = 5
    weight_decay: float = 3e-4
    adamax_epsilon: float = 1e-3
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 1e-4
    kl_const_coeff: float = 1e-4
    kl_balance: bool = True
    weight_decay_norm: float = 0.0
    weight_decay_norm_anneal: bool = False
    weight_decay_norm_init: float = 10.0
    num_power_iter: int = 4
    seed: int = 1
    # --- engineering (ours) -----------------------------------------------------------------
    precision: str = "float32"
    recompute: str = "none"
    jit_compile: bool = False
    grad_clip_norm: float = 0.0  # 0 disables clipping (the original never clips)
    ema_decay: float = 0.0  # 0 disables the weight EMA
    max_skipped_steps: int = 100  # stop if this many consecutive steps are non-finite

    def __post_init__(self):
        self._validate()

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "NVAEConfig":
        if not isinstance(values, dict):
            raise ConfigError(
                f"config must be a mapping of field: value, got {type(values).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str) -> "NVAEConfig":
        return cls.from_dict(read_yaml(path, "config file", ConfigError) or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str) -> None:
        """Write the config atomically: a killed write never leaves a half file at ``path``."""
        write_atomically(path, lambda f: yaml.safe_dump(self.to_dict(), f, sort_keys=False))

    def replace(self, **changes) -> "NVAEConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, assignments: Iterable[str]) -> "NVAEConfig":
        """Apply ``key=value`` strings (values parsed as YAML scalars)."""
        changes = {}
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            changes[key.strip()] = yaml.safe_load(value) if value.strip() else None
        return self.from_dict({**self.to_dict(), **changes})

    # --- derived layout (docs/design.md#layout-rules) ---------------------------------------
    @property
    def groups_per_scale(self):
        """Groups per latent scale, top (lowest resolution) scale first."""
        n, groups = self.num_groups_per_scale, []
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return groups[::-1]

    @property
    def num_groups(self):
        return sum(self.groups_per_scale)

    @property
    def top_size(self):
        return self.image_size // 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def latent_sizes(self):
        """Spatial size of each latent scale, top first."""
        return [self.top_size * 2**s for s in range(self.num_latent_scales)]

    @property
    def channels_per_scale(self):
        """Decoder channels at each latent scale, top first."""
        top_mult = CHANNEL_MULT ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        return [
            self.num_channels_dec * top_mult // CHANNEL_MULT**s
            for s in range(self.num_latent_scales)
        ]

    @property
    def h_shape(self):
        """Shape (H, W, C) of the learned top-down input h (``prior_ftr0``)."""
        return (self.top_size, self.top_size, self.channels_per_scale[0])

    @property
    def num_output_dims(self):
        """Dimensions D of the likelihood (bpd = nats / (ln2 * D)); MNIST scored on 28x28."""
        if self.decoder == "bernoulli" and self.image_size == 32 and self.is_mnist:
            return 28 * 28 * self.image_channels
        return self.image_size**2 * self.image_channels

    @property
    def is_mnist(self):
        return self.dataset in ("mnist", "bundled_mnist")

    @property
    def decoder_channels(self):
        """Output-conv channels: Bernoulli logits or mixture parameters (paper App. A)."""
        if self.decoder == "bernoulli":
            return self.image_channels
        return 10 * self.num_mixture_dec

    # --- validation -------------------------------------------------------------------------
    def _validate(self):
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        known = tuple(DATASETS) + CUSTOM_DATASETS
        need(
            self.dataset in known,
            f"dataset must be one of {', '.join(known)}; got {self.dataset!r}",
        )
        if self.dataset in DATASETS:
            size, ch, _, dec = DATASETS[self.dataset]
            need(
                self.image_size == size,
                f"dataset {self.dataset} has image_size {size}, config says {self.image_size}",
            )
            need(
                self.image_channels == ch,
                f"dataset {self.dataset} has {ch} channel(s), config says {self.image_channels}",
            )
            need(
                self.decoder == dec,
                f"dataset {self.dataset} uses the {dec} decoder, config says {self.decoder}",
            )
        need(
            self.decoder in DECODERS,
            f"decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}",
        )
        if self.decoder == "bernoulli":
            need(
                self.num_x_bits == 1,
                f"the bernoulli decoder models binary data: num_x_bits must be 1, got {self.num_x_bits}",
            )
        else:
            need(
                self.image_channels == 3,
                f"the logistic_mixture decoder models RGB images: image_channels must be 3, got {self.image_channels}",
            )
            need(
                1 <= self.num_x_bits <= 8 and self.num_x_bits != 1,
                f"num_x_bits must be between 2 and 8 for the logistic_mixture decoder, got {self.num_x_bits}",
            )
            need(
                self.num_mixture_dec >= 1,
                f"num_mixture_dec must be >= 1, got {self.num_mixture_dec}",
            )
        need(
            self.image_channels in (1, 3),
            f"image_channels must be 1 or 3, got {self.image_channels}",
        )
        need(
            0 <= self.test_fraction < 1,
            f"test_fraction must be in [0, 1), got {self.test_fraction}",
        )
        need(self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        for name in (
            "num_channels_enc",
            "num_channels_dec",
            "num_latent_scales",
            "num_groups_per_scale",
            "min_groups_per_scale",
            "num_latent_per_group",
            "num_preprocess_cells",
            "num_postprocess_cells",
            "num_cell_per_cond_enc",
            "num_cell_per_cond_dec",
            "image_size",
            "epochs",
            "batch_size",
            "num_power_iter",
        ):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "num_preprocess_blocks",
            "num_postprocess_blocks",
            "num_nf",
            "warmup_epochs",
            "weight_decay",
            "weight_decay_norm",
            "grad_clip_norm",
            "learning_rate_min",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(
            self.num_preprocess_blocks == self.num_postprocess_blocks,
            "num_postprocess_blocks must equal num_preprocess_blocks so the output matches the input size "
            f"({self.num_postprocess_blocks} != {self.num_preprocess_blocks})",
        )
        factor = 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        need(
            self.image_size % factor == 0,
            f"image_size {self.image_size} is not divisible by 2^(num_preprocess_blocks + num_latent_scales - 1) = {factor}",
        )
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(
            self.learning_rate_min <= self.learning_rate,
            f"learning_rate_min ({self.learning_rate_min}) must not exceed learning_rate ({self.learning_rate})",
        )
        need(
            self.warmup_epochs < self.epochs or self.epochs == 1,
            f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})",
        )
        need(
            0 < self.kl_anneal_portion <= 1,
            f"kl_anneal_portion must be in (0, 1], got {self.kl_anneal_portion}",
        )
        need(
            0 <= self.kl_const_portion < 1,
            f"kl_const_portion must be in [0, 1), got {self.kl_const_portion}",
        )
        need(
            0 < self.kl_const_coeff <= 1,
            f"kl_const_coeff must be in (0, 1], got {self.kl_const_coeff}",
        )
        need(self.adamax_epsilon > 0, f"adamax_epsilon must be > 0, got {self.adamax_epsilon}")
        if self.weight_decay_norm_anneal:
            need(
                self.weight_decay_norm > 0 and self.weight_decay_norm_init > 0,
                "weight_decay_norm_anneal needs weight_decay_norm > 0 and weight_decay_norm_init > 0",
            )
        need(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}",
        )
        need(
            self.recompute in RECOMPUTE,
            f"recompute must be one of {', '.join(RECOMPUTE)}; got {self.recompute!r}",
        )
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(
            self.max_skipped_steps >= 1,
            f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}",
        )


def _coerce(key, value, hint):
    """Check a YAML value against the field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads "1e-2" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def read_yaml(path, what, error):
    """Parse a YAML file; a missing file or bad YAML raises ``error`` with a one-line message."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{what} {path} is not valid YAML{where}: {problem}") from None
