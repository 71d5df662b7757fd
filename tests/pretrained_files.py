"""Test data of the checkpoint importer: the fixtures in tests/data/import/ and broken or
malicious checkpoint files written without PyTorch (plain ``pickle`` and ``zipfile``)."""

import argparse
import collections
import os
import pickle
import zipfile

from nvae_tf.pretrained.torch_reader import LEGACY_MAGIC, LEGACY_PROTOCOL

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "import")
# (checkpoint, reference) pairs written by the original code; see data/import/README.md.
FIXTURES = {
    "mnist_zip": ("mnist_tiny.pt", "mnist_tiny.npz"),
    "mnist_legacy": ("mnist_tiny_legacy.pt", "mnist_tiny.npz"),
    "cifar10_flow": ("cifar10_tiny_flow.pt", "cifar10_tiny_flow.npz"),
    "celeba64_5bit_two_flows": ("celeba64_5bit_nf2.pt", "celeba64_5bit_nf2.npz"),
}


def fixture_paths(name):
    checkpoint, reference = FIXTURES[name]
    return os.path.join(DATA, checkpoint), os.path.join(DATA, reference)


def write_zip_checkpoint(path, payload: bytes, archive="archive"):
    """A zip-format checkpoint whose data.pkl is ``payload`` (no storages)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{archive}/data.pkl", payload)
        z.writestr(f"{archive}/byteorder", "little")
        z.writestr(f"{archive}/version", "3\n")
    return path


def write_legacy_checkpoint(path, payload: bytes):
    """A legacy-format checkpoint around the object pickle ``payload`` (no storages)."""
    info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True, "type_sizes": {}}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, info):
            f.write(pickle.dumps(header, protocol=2))
        f.write(payload)
        f.write(pickle.dumps([], protocol=2))
    return path


class ShellCommand:
    """Pickles as a call of ``os.system(command)``: what a hostile checkpoint would hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_payload(marker):
    return pickle.dumps({"state_dict": ShellCommand(f"touch {marker}")}, protocol=2)


def args_only_payload(**args):
    """An NVAE-style checkpoint with ``args`` and an empty state dict."""
    content = {"state_dict": collections.OrderedDict(), "args": argparse.Namespace(**args)}
    return pickle.dumps(content, protocol=2)


def rewrite_zip(source, target, drop=(), replace=None):
    """Copy a zip checkpoint leaving out the members ``drop`` and replacing others."""
    replace = replace or {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            if name in drop:
                continue
            dst.writestr(name, replace.get(name, src.read(name)))
    return target
