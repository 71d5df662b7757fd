"""nvae-tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow, Keras and TFP."""

from nvae_tf.config import ConfigError, NVAEConfig
from nvae_tf.model import NVAE

__all__ = ["NVAE", "ConfigError", "NVAEConfig"]
__version__ = "0.1.0"
