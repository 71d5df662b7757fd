"""nvae-tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow, Keras and TFP."""

from nvae_tf.config import ConfigError, NVAEConfig

__all__ = ["NVAE", "ConfigError", "NVAEConfig"]
__version__ = "0.1.0"


def __getattr__(name):
    # NVAE loads TensorFlow: imported on first use, so that the command-line tools can load
    # TensorFlow quietly (trainers.cli.quiet_tensorflow) and still use nvae_tf's light modules.
    if name == "NVAE":
        from nvae_tf.model import NVAE

        return NVAE
    raise AttributeError(f"module 'nvae_tf' has no attribute {name!r}")
