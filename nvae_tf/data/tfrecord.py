"""TFRecord image sets: GLOW's CelebA-HQ (``celeba-tfr``), StyleGAN's FFHQ, or files you write.

A record holds either ``image`` (PNG/JPEG bytes, what ``write_tfrecords`` writes) or raw uint8
pixels in ``data`` with their ``shape`` ([H, W, C] as GLOW writes it, or [C, H, W] as StyleGAN
writes it). Files are every ``*.tfrecord*`` file of the split folder (``train/``,
``test/``/``validation/``) or of ``data_dir`` itself (flat: ``test_fraction`` of each file's
records held out); names with a ``-rNN`` resolution tag (GLOW, StyleGAN) keep only 2^NN =
``image_size``. Records of the wrong size or channel count stop the pipeline with the file and
record index in the message, or are skipped (one log line each) with ``skip_bad_files``.
"""

import functools
import os
import re

import numpy as np
import tensorflow as tf

from nvae_tf.data import layout
from nvae_tf.data.errors import DataError
from nvae_tf.data.source import AUTOTUNE, Source, shard

RESOLUTION_TAG = re.compile(r"-r(\d\d)(?=[.-])")


def _tfrecord_files(folder, image_size):
    if not os.path.isdir(folder):
        return []
    files = sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if ".tfrecord" in f and not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
    )
    tagged = [(f, RESOLUTION_TAG.search(os.path.basename(f))) for f in files]
    if any(tag for _, tag in tagged):
        files = [f for f, tag in tagged if tag and 2 ** int(tag.group(1)) == image_size]
    return files


def find_files(root, split, image_size):
    """``(files, flat)``: the split's TFRecord files, and whether they still need the held-out rule."""
    if not root:
        return [], True
    folder = layout.split_dir(root, split)
    if folder is not None:
        return _tfrecord_files(folder, image_size), False
    return _tfrecord_files(root, image_size), True


def has_files(root, image_size):
    return bool(find_files(root, "train", image_size)[0])


def _files(config, split, hint):
    files, flat = find_files(config.data_dir, split, config.image_size)
    if not files:
        where = config.data_dir or "<no data_dir set: data_dir: DIR or --data DIR>"
        raise DataError(
            f"dataset {config.dataset}: no {split} TFRecord files for {config.image_size}x{config.image_size} "
            f"images under {where}; expected train/*.tfrecord* and test/ (or validation/) *.tfrecord* files, "
            f"or flat *.tfrecord* files ({config.test_fraction:g} held out){hint}; see docs/datasets.md"
        )
    return files, flat


def _parse(record, size, channels):
    """Serialized example -> ``(uint8 [size, size, channels] image, ok, decoded shape)``."""
    features = tf.io.parse_single_example(
        record,
        {
            "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "data": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "shape": tf.io.FixedLenFeature([3], tf.int64, default_value=[0, 0, 0]),
        },
    )
    want = tf.constant([size, size, channels], tf.int64)
    blank = tf.zeros([size, size, channels], tf.uint8)

    def encoded():
        image = tf.io.decode_image(features["image"], channels=0, expand_animations=False)
        shape = tf.shape(image, out_type=tf.int64)
        ok = tf.reduce_all(tf.equal(shape, want))
        return tf.cond(ok, lambda: tf.reshape(image, want), lambda: blank), ok, shape

    def raw():
        pixels = tf.io.decode_raw(features["data"], tf.uint8)
        shape = features["shape"]
        sized = tf.equal(tf.size(pixels, out_type=tf.int64), size * size * channels)
        hwc = tf.logical_and(sized, tf.reduce_all(tf.equal(shape, want)))
        chw = tf.logical_and(sized, tf.reduce_all(tf.equal(shape, [channels, size, size])))
        image = tf.case(
            [
                (hwc, lambda: tf.reshape(pixels, want)),
                (chw, lambda: tf.transpose(tf.reshape(pixels, [channels, size, size]), [1, 2, 0])),
            ],
            default=lambda: blank,
        )
        return image, tf.logical_or(hwc, chw), shape

    return tf.cond(tf.strings.length(features["image"]) > 0, encoded, raw)


def tfrecord_source(config, split, input_context, *, shuffle, seed, hint=""):
    """A ``Source`` over this worker's share of the split's records."""
    files, flat = _files(config, split, hint)
    size, channels, fraction = config.image_size, config.image_channels, config.test_fraction
    test = split != "train"
    by_file = input_context is not None and len(files) >= input_context.num_input_pipelines
    names = tf.data.Dataset.from_tensor_slices(files)
    if by_file:  # enough files: each worker reads only its own
        names = shard(names, input_context)
    if shuffle:
        names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def records(name):
        ds = tf.data.TFRecordDataset(name).enumerate()
        if flat:
            ds = ds.filter(
                lambda i, _: tf.equal(layout.held_out(tf.cast(i, tf.float64), fraction), test)
            )
        return ds.map(lambda i, record: (name, i, record))

    elements = names.interleave(
        records, cycle_length=min(len(files), 16), num_parallel_calls=AUTOTUNE
    )
    if not by_file:
        elements = shard(elements, input_context)
    message = f"expected {size}x{size}x{channels}; set skip_bad_files: true to skip bad records"

    def decode(ds):
        def one(element, s):
            name, index, record = element
            image, ok, shape = _parse(record, size, channels)
            if not config.skip_bad_files:
                check = tf.debugging.Assert(
                    ok, ["bad record", index, "of", name, "with shape", shape, message]
                )
                with tf.control_dependencies([check]):
                    image = tf.identity(image)
            else:

                def report():
                    printed = tf.print(
                        "nvae-tf: skipping bad record", index, "of", name, "with shape", shape
                    )
                    with tf.control_dependencies([printed]):
                        return tf.identity(ok)

                ok = tf.cond(ok, lambda: ok, report)
            return image, s, ok

        ds = ds.map(one, num_parallel_calls=AUTOTUNE)
        if config.skip_bad_files:
            ds = ds.filter(lambda image, s, ok: ok).ignore_errors(log_warning=True)
        return ds.map(lambda image, s, ok: (image, s))

    return Source(elements, decode)


@functools.lru_cache(maxsize=32)
def _count(files, flat, fraction, test, stamp):
    total = 0
    for name in files:  # one pass over the records; TFRecord files carry no count
        n = int(tf.data.TFRecordDataset(name).reduce(np.int64(0), lambda c, _: c + 1))
        total += sum(layout.held_out(i, fraction) == test for i in range(n)) if flat else n
    return total


def tfrecord_num_examples(config, split, hint=""):
    """Records of ``split`` (all records, bad ones included; counted once per process)."""
    files, flat = _files(config, split, hint)
    stamp = tuple((os.path.getsize(f), os.path.getmtime(f)) for f in files)
    return _count(tuple(files), flat, config.test_fraction, split != "train", stamp)


def write_tfrecords(images, path):
    """Write uint8 HWC images (an iterable of arrays) as PNG-encoded ``image`` records to ``path``.

    For turning a folder or array into TFRecords, e.g. for many-host training that shards by file.
    """
    with tf.io.TFRecordWriter(path) as writer:
        for image in images:
            encoded = tf.io.encode_png(np.asarray(image, np.uint8)).numpy()
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
                    }
                )
            )
            writer.write(example.SerializeToString())
