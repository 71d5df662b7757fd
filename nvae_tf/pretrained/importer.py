"""Turn a released PyTorch NVAE checkpoint into an ordinary nvae-tf run directory.

``import_checkpoint`` reads the file safely (``torch_reader``), derives the config from its
``args`` (``checkpoint_args``), builds our model and fills every weight (``state_dict_map``),
optionally proves the result against a reference (``verification``), and only then writes
``config.yaml`` and ``checkpoints/`` into a temporary sibling of the run directory, renamed
into place at the end: a failed or interrupted import leaves nothing behind.
"""

import dataclasses
import os
import shutil

from nvae_tf.pretrained.checkpoint_args import config_from_args
from nvae_tf.pretrained.state_dict_map import load_state_dict
from nvae_tf.pretrained.torch_reader import CheckpointReadError, SavedArgs, TorchCheckpoint
from nvae_tf.pretrained.verification import load_reference, verify

SPECTRAL_NOTE = (
    "spectral power-iteration vectors: not in the original's checkpoints, they start fresh "
    "(the first regularizer call iterates 10x longer, as in the original)"
)


class ImportFailed(ValueError):
    """The import could not complete; nothing was written (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """The written run directory (None when verification failed), config, notes, check."""

    run_dir: str | None
    config: object
    notes: tuple
    verification: object = None


def import_checkpoint(checkpoint_path, out_dir, reference=None, data_dir=None) -> ImportResult:
    """Import ``checkpoint_path`` into the new run directory ``out_dir``.

    ``data_dir`` is recorded as the run's dataset location (as ``nvae-train --data``).

    With ``reference`` (an ``.npz``, see ``verification``) the model is checked first, and
    the run directory is written only if every compared value is within tolerance.
    Raises ``CheckpointReadError``, ``UnsupportedCheckpoint``, ``MappingError``,
    ``VerificationError`` or ``ImportFailed`` (all ``ValueError``, one-line messages).
    """
    from nvae_tf.model import NVAE

    _check_target(out_dir)
    if reference is not None:
        load_reference(reference)  # a bad path or file fails before the long part
    with TorchCheckpoint(checkpoint_path) as checkpoint:
        content = checkpoint.content
        if not isinstance(content, dict) or "state_dict" not in content or "args" not in content:
            raise CheckpointReadError(
                f"{checkpoint_path} is not an NVAE training checkpoint (no state_dict and args)"
            )
        if not isinstance(content["args"], SavedArgs) or not isinstance(
            content["state_dict"], dict
        ):
            raise CheckpointReadError(f"{checkpoint_path}: args or state_dict of an unknown kind")
        conversion = config_from_args(content["args"].to_dict())
        config = conversion.config.replace(data_dir=data_dir)
        model = NVAE(config)
        report = load_state_dict(model, content["state_dict"], checkpoint.array)
    notes = tuple(
        line
        for line in (conversion.note(), report.ignored_line(), SPECTRAL_NOTE)
        if line is not None
    )
    check = verify(model, reference) if reference is not None else None
    if check is not None and not check.ok:
        return ImportResult(None, config, notes, check)
    _write_run_dir(model, out_dir)
    return ImportResult(out_dir, config, notes, check)


def _check_target(out_dir):
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise ImportFailed(f"--out {out_dir} already exists: choose a new run directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ImportFailed(f"the folder of --out does not exist: {parent}")


def _write_run_dir(model, out_dir):
    """config.yaml and one checkpoint, written aside and renamed into place."""
    import tensorflow as tf

    from nvae_tf.run_dir import checkpoint_dir, config_path

    out_dir = os.path.abspath(out_dir)
    staging = f"{out_dir}.importing-{os.getpid()}"
    try:
        os.makedirs(staging)
        model.config.to_yaml(config_path(staging))
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model), checkpoint_dir(staging), max_to_keep=1
        )
        manager.save()
        if os.path.isdir(out_dir):  # an empty directory may be taken over
            os.rmdir(out_dir)
        os.rename(staging, out_dir)
    except OSError as e:
        raise ImportFailed(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
