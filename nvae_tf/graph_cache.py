"""A disk cache of TensorFlow's optimized function graphs, keyed by the graph that was traced.

Before a traced function first runs, TensorFlow optimizes it (Grappler, placement, the XLA and
oneDNN rewrite passes): 3.5 s of the MNIST paper config's start-up and 9 s of the CIFAR-10
paper config's at batch 4. TensorFlow can save that result and load it in a later process: it
reads the directory named by ``TF_GRAPH_CACHING`` when it instantiates a function, and writes
there any function whose optimization took 3 s or more. Its key is the function's name
alone, which another model, another batch size or other code can share; used as it is, it
would run a stale graph.

``instantiating`` makes it safe. The cache holds one entry per *fingerprint*: a hash of the
traced graph with its nested functions, its name and attributes, the variables it captures
(dtype and shape), TensorFlow's version, the optimizer options, the devices and the
``TF_*`` settings. Each call gets a private directory, which holds only that fingerprint's
entry. A graph written there is moved into the cache by one atomic rename, so a concurrent
reader never sees part of an entry.

The cache lives in ``$NVAE_TF_GRAPH_CACHE``, by default ``~/.cache/nvae_tf/graphs`` (under
``$XDG_CACHE_HOME`` if set); ``NVAE_TF_GRAPH_CACHE=off`` turns it off. It keeps the most
recently used entries, at most ``MAX_ENTRIES`` of them and ``MAX_BYTES`` in all. The entries
are graphs that TensorFlow runs, so the directory gets the same trust as the code; it is
created private to the user (0700).
Caching is best effort: a cache that cannot be read or written logs one warning and the
function is optimized as usual.
"""

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

ENV_VAR = "NVAE_TF_GRAPH_CACHE"
TF_ENV_VAR = "TF_GRAPH_CACHING"  # read by TensorFlow's function instantiation (C++)
MAX_ENTRIES = 16
MAX_BYTES = 1 << 30  # entries are 8 MB (MNIST step) to tens of MB (the paper's larger configs)
_STALE_WORK_S = 24 * 3600  # a private directory left behind by a process that died
_OFF = ("", "0", "off", "false", "no")
# TF_* settings that do not change an optimized graph (logging, this cache itself).
_IGNORED_TF_SETTINGS = ("TF_CPP_", TF_ENV_VAR)

_log = logging.getLogger(__name__)


def cache_dir():
    """The cache's directory, or None when ``$NVAE_TF_GRAPH_CACHE`` turns it off."""
    setting = os.environ.get(ENV_VAR)
    if setting is not None:
        return None if setting.strip().lower() in _OFF else os.path.abspath(setting)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nvae_tf", "graphs")


def fingerprint(concrete, config_proto=None):
    """Hex digest of everything TensorFlow's optimized graph of ``concrete`` depends on.

    ``config_proto``: the serialized ``ConfigProto`` of the call (its optimizer options).
    """
    digest = hashlib.sha256()

    def add(data):
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    add(tf.__version__.encode())
    add(concrete.function_def.SerializeToString(deterministic=True))  # body, name, attrs
    add(concrete.graph.as_graph_def().library.SerializeToString(deterministic=True))
    for captured in concrete.captured_inputs:
        add(repr(captured.dtype).encode())
        handle_data = getattr(captured, "_handle_data", None)  # a variable's dtype and shape
        add(handle_data.SerializeToString(deterministic=True) if handle_data else b"")
    if config_proto:
        config = config_pb2.ConfigProto.FromString(config_proto)
        add(config.SerializeToString(deterministic=True))
    add(repr(sorted(d.name for d in tf.config.list_logical_devices())).encode())
    settings = sorted(
        (k, v)
        for k, v in os.environ.items()
        if k.startswith("TF_") and not k.startswith(_IGNORED_TF_SETTINGS)
    )
    add(repr(settings).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def instantiating(concrete, config_proto=None):
    """Run the first call of ``concrete`` inside: its optimized graph comes from the cache,
    or goes into it when TensorFlow writes one (``config_proto`` as in ``fingerprint``)."""
    root = cache_dir()
    if root is None:
        yield
        return
    try:
        entry = os.path.join(root, fingerprint(concrete, config_proto))
        os.makedirs(root, mode=0o700, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".instantiating-", dir=root)
        hit = os.path.isdir(entry)
        if hit:
            for name in os.listdir(entry):
                shutil.copyfile(os.path.join(entry, name), os.path.join(work, name))
            os.utime(entry)  # most recently used
    except OSError as error:
        _log.warning("nvae_tf graph cache at %s not used: %s", root, error)
        yield
        return
    previous = os.environ.get(TF_ENV_VAR)
    os.environ[TF_ENV_VAR] = work
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TF_ENV_VAR]
        else:
            os.environ[TF_ENV_VAR] = previous
        _store(work, entry, concrete.name, hit, root)


def _store(work, entry, function_name, hit, root):
    """Keep what TensorFlow wrote for ``function_name`` in ``work`` as ``entry``; drop the rest."""
    try:
        if isinstance(function_name, bytes):
            function_name = function_name.decode()
        # TensorFlow names the file after the function without its unique-id suffix.
        plain = function_name.rsplit("_", 1)[0]
        written = [n for n in os.listdir(work) if plain in n]
        if hit or not written:
            shutil.rmtree(work, ignore_errors=True)
            return
        for name in os.listdir(work):
            if name not in written:
                os.remove(os.path.join(work, name))
        try:
            os.rename(work, entry)  # atomic; fails if another process stored it first
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
        _prune(root)
    except OSError as error:
        _log.warning("nvae_tf graph cache at %s not written: %s", root, error)
        shutil.rmtree(work, ignore_errors=True)


def _prune(root):
    """Keep the most recently used entries, at most ``MAX_ENTRIES`` and ``MAX_BYTES`` in all
    (the newest always), and delete old leftovers."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".instantiating-") and _age(path) > _STALE_WORK_S:
            shutil.rmtree(path, ignore_errors=True)
    entries = [
        os.path.join(root, name)
        for name in os.listdir(root)
        if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
    ]
    entries.sort(key=_mtime, reverse=True)
    total = 0
    for rank, entry in enumerate(entries):
        total += _size(entry)
        if rank >= MAX_ENTRIES or (rank > 0 and total > MAX_BYTES):
            shutil.rmtree(entry, ignore_errors=True)


def _size(folder):
    try:
        return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
    except OSError:
        return 0


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:  # removed meanwhile by another process
        return time.time()


def _age(path):
    return time.time() - _mtime(path)
