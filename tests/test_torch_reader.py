"""The safe PyTorch checkpoint reader: both formats, hostile and broken files (no TF model)."""

import io
from pathlib import Path

import numpy as np
import pytest
from pretrained_files import (
    fixture_paths,
    malicious_payload,
    rewrite_zip,
    write_legacy_checkpoint,
    write_zip_checkpoint,
)

from nvae_tf.pretrained.torch_reader import (
    CheckpointReadError,
    SavedArgs,
    StoredTensor,
    TorchCheckpoint,
    _unpickle,
)

ZIP, _ = fixture_paths("mnist_zip")
LEGACY, _ = fixture_paths("mnist_legacy")


def _read_error(path):
    with pytest.raises(CheckpointReadError) as info, TorchCheckpoint(path) as checkpoint:
        for tensor in checkpoint.content["state_dict"].values():
            checkpoint.array(tensor)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_zip_and_legacy_files_hold_the_same_state_dict():
    with TorchCheckpoint(ZIP) as new, TorchCheckpoint(LEGACY) as old:
        assert (new.format, old.format) == ("zip", "legacy")
        assert isinstance(new.content["args"], SavedArgs)
        assert new.content["args"].to_dict() == old.content["args"].to_dict()
        assert new.content["args"].dataset == "mnist"
        state, old_state = new.content["state_dict"], old.content["state_dict"]
        assert list(state) == list(old_state) and len(state) == 684
        for key in state:
            a, b = new.array(state[key]), old.array(old_state[key])
            assert a.dtype == b.dtype and a.shape == b.shape, key
            np.testing.assert_array_equal(a, b, err_msg=key)
        kernel = new.array(state["stem.weight"])
        assert kernel.shape == (4, 1, 3, 3) and kernel.dtype == np.float32
        assert new.array(state["pre_process.0._ops.0.bn_act.num_batches_tracked"]).dtype == np.int64


def test_strided_views_are_rebuilt_from_their_storage(tmp_path):
    with TorchCheckpoint(ZIP) as checkpoint:
        tensor = checkpoint.content["state_dict"]["stem.weight"]  # (4, 1, 3, 3) contiguous
        flat = checkpoint.array(tensor).reshape(-1)
        # A transposed (stride-permuted) view and an offset view of the same storage.
        transposed = StoredTensor(tensor.storage, 0, (3, 12), (1, 3))
        np.testing.assert_array_equal(checkpoint.array(transposed), flat.reshape(12, 3).T)
        shifted = StoredTensor(tensor.storage, 30, (6,), (1,))
        np.testing.assert_array_equal(checkpoint.array(shifted), flat[30:])
        beyond = StoredTensor(tensor.storage, 31, (6,), (1,))  # one element past the end
        with pytest.raises(CheckpointReadError, match="too short"):
            checkpoint.array(beyond)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_malicious_pickle_is_refused_without_running_anything(tmp_path, container):
    marker = tmp_path / "pwned"
    write = write_zip_checkpoint if container == "zip" else write_legacy_checkpoint
    path = write(str(tmp_path / "evil.pt"), malicious_payload(marker))
    message = _read_error(path)
    assert "refused" in message and "system" in message
    assert not marker.exists()


def test_a_truncated_zip_file(tmp_path):
    data = Path(ZIP).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _read_error(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_legacy_file(tmp_path, keep):
    data = Path(LEGACY).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in _read_error(str(path))


def test_a_missing_storage(tmp_path):
    path = rewrite_zip(ZIP, str(tmp_path / "holes.pt"), drop={"mnist_tiny/data/3"})
    assert _read_error(path) == "missing storage: data/3 is not in the archive"


def test_a_storage_shorter_than_its_tensor(tmp_path):
    path = rewrite_zip(ZIP, str(tmp_path / "short.pt"), replace={"mnist_tiny/data/1": b"\0" * 8})
    assert "storage 1 is too short" in _read_error(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, not a checkpoint\n",
        np.random.default_rng(0).bytes(256),
    ],
)
def test_an_unknown_format(tmp_path, content):
    path = tmp_path / "other.pt"
    path.write_bytes(content)
    assert _read_error(str(path)).startswith("unknown format")


def test_a_pickle_frame_longer_than_any_file():
    # pickle raises OverflowError here, which once escaped as a traceback.
    with pytest.raises(CheckpointReadError, match="corrupt pickle"):
        _unpickle(io.BytesIO(b"\x80\x04\x95" + b"\xff" * 8))


def test_a_missing_file(tmp_path):
    assert _read_error(str(tmp_path / "nope.pt")).startswith("cannot open")


def test_a_pickle_cannot_alter_the_readers_own_objects(tmp_path):
    # BUILD sets attributes on what the pickle holds: on the Namespace stand-in class it is
    # refused; on a storage type it changes a throw-away instance, never the reader's table.
    on_class = b"\x80\x02cargparse\nNamespace\nN}X\x07\x00\x00\x00to_dictK\x01s\x86b."
    on_type = b"\x80\x02ctorch\nFloatStorage\n}X\x04\x00\x00\x00nameX\x01\x00\x00\x00xsb."
    assert "corrupt pickle" in _read_error(write_zip_checkpoint(str(tmp_path / "a.pt"), on_class))
    with TorchCheckpoint(write_zip_checkpoint(str(tmp_path / "b.pt"), on_type)) as checkpoint:
        assert checkpoint.content.name == "x"
    assert callable(SavedArgs.to_dict)
    with TorchCheckpoint(ZIP) as checkpoint:
        assert checkpoint.content["args"].to_dict()["dataset"] == "mnist"
        np.testing.assert_array_equal(
            checkpoint.array(checkpoint.content["state_dict"]["stem.bias"]).shape, (4,)
        )


def test_a_broadcast_tensor_larger_than_its_storage_is_refused():
    with TorchCheckpoint(ZIP) as checkpoint:
        storage = checkpoint.content["state_dict"]["stem.weight"].storage
        with pytest.raises(CheckpointReadError, match="larger than its storage"):
            checkpoint.array(StoredTensor(storage, 0, (10**9,), (0,)))
