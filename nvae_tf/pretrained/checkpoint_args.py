"""The ``NVAEConfig`` of a released checkpoint, from the ``args`` its training run saved.

The original stores its whole command line (an ``argparse.Namespace``) in every checkpoint.
Architecture and training fields keep their names here; the dataset name fixes the image
size, channels and output distribution as in the original (MNIST: Bernoulli on 32x32
binarized digits; every other set: a logistic mixture over ``num_x_bits``-bit RGB; OMNIGLOT,
Bernoulli in the original too, has no dataset here and is refused).
Checkpoints written before three options existed lack them; they are filled in as the
original's ``evaluate.py`` does.
"""

import dataclasses

from nvae_tf.config import ARCHITECTURE_FIELDS, DATASETS, NVAEConfig

# The original's dataset names -> ours.
DATASET_NAMES = {
    "mnist": "mnist",
    "cifar10": "cifar10",
    "celeba_64": "celeba64",
    "celeba_256": "celebahq256",
    "imagenet_32": "imagenet32",
    "ffhq": "ffhq256",
}
# Missing in checkpoints of older code versions; the original's evaluate.py fills these in.
OLD_CHECKPOINT_DEFAULTS = {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}
# The architecture fields of the original's args (ours, less what the dataset decides).
ARGS_ARCHITECTURE_FIELDS = tuple(
    f for f in ARCHITECTURE_FIELDS if f not in ("image_size", "image_channels", "decoder")
)
TRAINING_FIELDS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "learning_rate_min",
    "warmup_epochs",
    "weight_decay",
    "kl_anneal_portion",
    "kl_const_portion",
    "kl_const_coeff",
    "weight_decay_norm",
    "weight_decay_norm_anneal",
    "weight_decay_norm_init",
    "seed",
)
SUPPORTED_ARCH_INSTANCE = "res_mbconv"  # the cell set of every released checkpoint


class UnsupportedCheckpoint(ValueError):
    """A checkpoint whose ``args`` describe a model nvae-tf does not build (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ArgsConversion:
    """The config, and the option names filled in with old-checkpoint defaults (maybe none)."""

    config: NVAEConfig
    filled_in: tuple

    def note(self) -> str | None:
        """One line saying which defaults were filled in, or None."""
        if not self.filled_in:
            return None
        values = ", ".join(f"{k}={OLD_CHECKPOINT_DEFAULTS[k]}" for k in self.filled_in)
        return f"old checkpoint without {', '.join(self.filled_in)}: using {values} as the original's evaluate.py does"


def config_from_args(args: dict) -> ArgsConversion:
    """Convert a checkpoint's saved ``args`` (as a dict) into our config.

    Raises ``UnsupportedCheckpoint`` naming the field and value for what we cannot build:
    another ``arch_instance``, ``num_mixture_dec: 1`` (the Gaussian output), a dataset without
    a counterpart here, or a single-group "vanilla VAE".
    """
    args = dict(args)
    filled = tuple(k for k in OLD_CHECKPOINT_DEFAULTS if k not in args)
    args = {**{k: OLD_CHECKPOINT_DEFAULTS[k] for k in filled}, **args}
    missing = [k for k in ("dataset", *ARGS_ARCHITECTURE_FIELDS) if k not in args]
    if missing:
        raise UnsupportedCheckpoint(f"the checkpoint's args lack {', '.join(missing)}")
    dataset = args["dataset"]
    if dataset not in DATASET_NAMES:
        raise UnsupportedCheckpoint(
            f"unsupported dataset: {dataset!r} (supported: {', '.join(DATASET_NAMES)})"
        )
    arch = args.get("arch_instance", SUPPORTED_ARCH_INSTANCE)
    if arch != SUPPORTED_ARCH_INSTANCE:
        raise UnsupportedCheckpoint(
            f"unsupported arch_instance: {arch!r} (nvae-tf builds {SUPPORTED_ARCH_INSTANCE!r})"
        )
    ours = DATASET_NAMES[dataset]
    size, channels, _, decoder = DATASETS[ours]
    if decoder == "logistic_mixture" and args["num_mixture_dec"] == 1:
        raise UnsupportedCheckpoint(
            "unsupported num_mixture_dec: 1 (the original's Gaussian output; nvae-tf has the "
            "logistic mixture only)"
        )
    if args["num_latent_scales"] == 1 and args["num_groups_per_scale"] == 1:
        raise UnsupportedCheckpoint(
            "unsupported num_groups_per_scale: 1 with num_latent_scales: 1 (the original's "
            "single-group 'vanilla VAE' variant)"
        )
    values = {k: args[k] for k in ARGS_ARCHITECTURE_FIELDS}
    values.update({k: args[k] for k in TRAINING_FIELDS if k in args})
    values.update(
        dataset=ours,
        image_size=size,
        image_channels=channels,
        decoder=decoder,
        num_x_bits=1 if decoder == "bernoulli" else args.get("num_x_bits", 8),
        # Reproduce the original's likelihoods (and the paper's numbers); see docs/pretrained.md.
        original_dml_edge=decoder == "logistic_mixture",
    )
    try:
        config = NVAEConfig.from_dict(values)
    except ValueError as e:
        raise UnsupportedCheckpoint(f"the checkpoint's args give an invalid config: {e}") from None
    return ArgsConversion(config, filled)
