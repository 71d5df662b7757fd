"""The named side-by-side configurations of issue 13 and the synthetic batch both sides train on.

Standard library and NumPy only: the original's driver imports this module from its own
(PyTorch) environment.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Setup:
    """One configuration timed on both sides."""

    name: str
    config_file: str  # ours, relative to the repository root
    overrides: tuple[tuple[str, object], ...]  # NVAEConfig fields replaced on top of the file
    batch: int
    official: str  # the same layout's name in official_bench.CONFIGS
    startup_target_s: float | None  # issue 13's start-up target for this configuration


SETUPS = {
    setup.name: setup
    for setup in (
        Setup("mnist", "configs/mnist.yaml", (), 16, "mnist", 30.0),
        Setup(
            "cifar10-cpu",
            "configs/cifar10.yaml",
            (("num_channels_enc", 32), ("num_channels_dec", 32), ("num_groups_per_scale", 10)),
            16,
            "cifar10-cpu",
            20.0,
        ),
        Setup("cifar10", "configs/cifar10.yaml", (), 4, "cifar10", 60.0),
    )
}


def synthetic_images(batch: int, size: int, channels: int, binary: bool, seed: int = 0):
    """A (batch, size, size, channels) float32 batch in [0, 1], the same on both sides.

    Binary (MNIST, Bernoulli decoder) images are 0/1; colour ones sit on the 256 levels of
    8-bit data. The original takes the (0, 3, 1, 2) transpose of the very same array.
    """
    uniform = np.random.default_rng(seed).random((batch, size, size, channels))
    levels = 1 if binary else 255
    return (np.round(uniform * levels) / levels).astype(np.float32)
