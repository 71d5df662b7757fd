"""Image folders: CelebA-HQ 256, FFHQ 256 and any custom set (``dataset: folder``), no code edits.

Every non-hidden file under the split's folder (recursively, sorted) must be a PNG or JPEG of
exactly ``image_size`` x ``image_size`` with ``image_channels`` channels (L or RGB). Files are
checked up front from their headers (cheap, no decoding), so a bad file is named before
training starts: by default the first one is reported in a ``DataError``; with
``skip_bad_files`` they are left out and counted in a warning. Payload corruption that only
decoding reveals (a truncated file) is caught where the file is decoded and named: skipped
with a warning (skip mode) or raised as one marked line that the training loop turns into a
``DataError`` (default). The decode runs in ``tf.py_function`` for that; it keeps no state, so
the iterator is checkpointed without it (``Source.python_decode``).
Own code rather than ``tfds.folder_dataset.ImageFolder``: that one needs split/label/ sub-folders
and checks nothing, while NVAE data is unlabelled and often a flat folder.
"""

import concurrent.futures
import logging
import os

import tensorflow as tf
from PIL import Image

from nvae_tf.data import layout
from nvae_tf.data.errors import MARK, DataError
from nvae_tf.data.source import AUTOTUNE, Source, shard, shard_size
from nvae_tf.tf_messages import one_line

FORMATS = ("PNG", "JPEG")
MODES = {1: "L", 3: "RGB"}
log = logging.getLogger(__name__)


def list_files(root):
    """All non-hidden files under ``root``, recursively, in sorted order."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, f) for f in sorted(files) if not f.startswith("."))
    return found


def check_image(path, size, channels):
    """Why ``path`` cannot be used as a ``size`` x ``size`` x ``channels`` image, or None if it can."""
    try:
        with Image.open(path) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
    except Exception as e:  # PIL raises many types for non-images and broken headers
        return f"not a readable image ({type(e).__name__})"
    if fmt not in FORMATS:
        return f"format {fmt}, expected PNG or JPEG"
    if mode != MODES[channels]:
        return f"mode {mode}, expected {MODES[channels]} ({channels} channel{'s' * (channels > 1)})"
    if (width, height) != (size, size):
        return f"size {width}x{height}, expected {size}x{size}"
    return None


def split_files(config, split, hint=""):
    """The files of ``split`` (all files; bad ones are sorted out by ``scan``)."""
    root = config.data_dir
    if not root or not os.path.isdir(root):
        where = (
            f"data_dir {root} does not exist"
            if root
            else "no data_dir is set (data_dir: DIR or --data DIR)"
        )
        raise DataError(
            f"dataset {config.dataset}: {where}; expected a folder of {_kind(config)} images, "
            f"either in train/ and test/ sub-folders or flat ({config.test_fraction:g} held out "
            f"for testing){hint}; see docs/datasets.md"
        )
    missing = layout.missing_split_dir(root)
    if missing:
        names = "train/" if missing == "train" else "test/ (or validation/)"
        raise DataError(
            f"dataset {config.dataset}: {root} has only one split sub-folder; add a {names} "
            f"folder of {_kind(config)} images next to it, or use one flat folder"
        )
    folder = layout.split_dir(root, split)
    if folder is not None:
        return folder, list_files(folder)
    return root, layout.select(list_files(root), split, config.test_fraction)


def _kind(config):
    colour = "RGB" if config.image_channels == 3 else "greyscale (mode L)"
    return f"{config.image_size}x{config.image_size} {colour} PNG/JPEG"


def scan(config, split, hint=""):
    """The usable image paths of ``split``; raises ``DataError`` for missing data or bad files."""
    folder, files = split_files(config, split, hint)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        reasons = list(
            pool.map(lambda p: check_image(p, config.image_size, config.image_channels), files)
        )
    bad = [(p, r) for p, r in zip(files, reasons) if r is not None]
    if bad and not config.skip_bad_files:
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DataError(
            f"dataset {config.dataset}: bad file {path}: {reason}{more}; fix or remove it, "
            f"or set skip_bad_files: true to skip bad files"
        )
    if bad:
        log.warning(
            "dataset %s: skipped %d bad file(s) of %d in %s (first: %s: %s)",
            config.dataset,
            len(bad),
            len(files),
            folder,
            *bad[0],
        )
    good = [p for p, r in zip(files, reasons) if r is None]
    if not good:
        raise DataError(
            f"dataset {config.dataset}: no usable {split} images in {folder}; expected "
            f"{_kind(config)} files there{hint}; see docs/datasets.md"
        )
    return good


def folder_source(config, split, input_context, hint=""):
    """A ``Source`` over this worker's share of the folder's files."""
    paths = scan(config, split, hint)
    size, channels = config.image_size, config.image_channels

    skip = config.skip_bad_files
    blank = tf.zeros([size, size, channels], tf.uint8)

    def read(path):
        """Decode one file eagerly (inside ``tf.py_function``) so a failure can name it."""
        name = path.numpy().decode()
        try:
            image = tf.io.decode_image(
                tf.io.read_file(path), channels=channels, expand_animations=False
            )
            if tuple(image.shape) != (size, size, channels):
                raise ValueError(f"decoded to {tuple(image.shape)}")
            return image, True
        except (tf.errors.OpError, ValueError) as e:
            why = one_line(e)
            if skip:
                log.warning(
                    "dataset %s: skipping %s: cannot decode it (%s)", config.dataset, name, why
                )
                return blank, False
            raise ValueError(
                f"{MARK}dataset {config.dataset}: bad file {name}: cannot decode it ({why}); "
                "fix or remove it, or set skip_bad_files: true to skip bad files"
            ) from None

    @tf.autograph.experimental.do_not_convert
    def decode_one(path, s):
        image, ok = tf.py_function(read, [path], (tf.uint8, tf.bool))
        return tf.ensure_shape(image, [size, size, channels]), s, ok

    def decode(ds):
        ds = ds.map(decode_one, num_parallel_calls=AUTOTUNE)
        if skip:
            ds = ds.filter(lambda image, s, ok: ok)
        return ds.map(lambda image, s, ok: (image, s))

    elements = shard(tf.data.Dataset.from_tensor_slices(paths), input_context)
    return Source(elements, decode, shard_size(len(paths), input_context), python_decode=True)


def folder_num_examples(config, split, hint=""):
    return len(scan(config, split, hint))
