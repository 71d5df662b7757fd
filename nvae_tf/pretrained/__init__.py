"""Import the authors' released PyTorch NVAE checkpoints, without PyTorch (docs/pretrained.md)."""

from nvae_tf.pretrained.checkpoint_args import UnsupportedCheckpoint, config_from_args
from nvae_tf.pretrained.importer import ImportFailed, ImportResult, import_checkpoint
from nvae_tf.pretrained.state_dict_map import MappingError, load_state_dict
from nvae_tf.pretrained.torch_reader import CheckpointReadError, TorchCheckpoint
from nvae_tf.pretrained.verification import VerificationError, verify

# Every error an import reports as one line.
IMPORT_ERRORS = (
    CheckpointReadError,
    UnsupportedCheckpoint,
    MappingError,
    VerificationError,
    ImportFailed,
)

__all__ = [
    "IMPORT_ERRORS",
    "CheckpointReadError",
    "ImportFailed",
    "ImportResult",
    "MappingError",
    "TorchCheckpoint",
    "UnsupportedCheckpoint",
    "VerificationError",
    "config_from_args",
    "import_checkpoint",
    "load_state_dict",
    "verify",
]
