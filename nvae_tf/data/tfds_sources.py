"""Paper datasets that TensorFlow Datasets provides: MNIST, CIFAR-10, CelebA 64 and ImageNet 32.

Always read from a local TFDS data directory with ``download=False`` (without it an offline
``tfds.load`` hangs for minutes); a missing dataset is one ``DataError`` line saying where the
files were expected and how to prepare them. MNIST and CIFAR-10 are small enough to decode once
into memory (full shuffles, index-sized checkpoints); CelebA and ImageNet stream encoded bytes and
decode them in parallel. Splits follow the original (docs/design.md#data): CelebA 64 evaluates on
the official validation split, ImageNet 32 on its validation set.
"""

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from nvae_tf.data import preprocess
from nvae_tf.data.errors import DataError
from nvae_tf.data.source import AUTOTUNE, Source, from_array

CELEBA64_CROP = (
    40,
    15,
    148,
    148,
)  # (top, left, height, width): the original's box (15, 40, 163, 188)


def _decode_celeba64(encoded):
    """CelebA 218x178 JPEG -> 148x148 crop -> 64x64 (the original's crop and ``Resize(64)``)."""
    image = tf.io.decode_and_crop_jpeg(
        encoded, CELEBA64_CROP, channels=3, dct_method="INTEGER_ACCURATE"
    )  # PIL's (libjpeg ISLOW) decoder
    return preprocess.resize_to(image, 64)


def _decode_imagenet32(encoded):
    """Downsampled ImageNet PNG (TFDS keeps the original bytes) -> 32x32 (no-op on real data)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return preprocess.resize_to(image, 32)


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    name: str
    test_split: str
    how_to_get: str
    decode: Callable | None = None  # streamed: encoded bytes -> uint8 image
    transform: Callable | None = None  # in memory: uint8 image -> uint8 image


SPECS = {
    "mnist": TfdsSpec(
        "mnist", "test", "`tfds build mnist --data_dir DIR`", transform=preprocess.pad_mnist
    ),
    "cifar10": TfdsSpec("cifar10", "test", "`tfds build cifar10 --data_dir DIR`"),
    "celeba64": TfdsSpec(
        "celeb_a",
        "validation",
        "`tfds build celeb_a --data_dir DIR` (downloads from Google Drive; retry later if "
        "its quota is exceeded)",
        decode=_decode_celeba64,
    ),
    "imagenet32": TfdsSpec(
        "downsampled_imagenet/32x32",
        "validation",
        "`tfds build downsampled_imagenet/32x32 --data_dir DIR` (fetches train_32x32.tar "
        "and valid_32x32.tar from image-net.org/small)",
        decode=_decode_imagenet32,
    ),
}


def _tfds_split(spec, split):
    return "train" if split == "train" else spec.test_split


def _missing(spec, config, tfds_split):
    import tensorflow_datasets as tfds

    builder = tfds.builder(spec.name, data_dir=config.data_dir)
    expected = builder.data_dir  # <root>/<name>[/<config>]/<version>
    root = expected[: expected.index(os.sep + spec.name.split("/")[0] + os.sep)]
    family = os.path.dirname(expected)
    found = sorted(os.listdir(family)) if os.path.isdir(family) else []
    found = (
        f" (found version {', '.join(found)}; this tensorflow-datasets reads {builder.version})"
        if found
        else ""
    )
    return DataError(
        f"dataset {config.dataset}: no prepared TFDS '{spec.name}' {tfds_split} data in {expected}{found}; "
        f"expected dataset_info.json and *.tfrecord* files there. Prepare it where there is internet with "
        f"{spec.how_to_get}, then copy DIR/{spec.name.split('/')[0]} into {root} (or point --data / data_dir "
        f"at DIR); see docs/datasets.md"
    )


def _load(spec, config, tfds_split, **kwargs):
    """``tfds.load`` from the local data directory only; missing data becomes a ``DataError``."""
    import tensorflow_datasets as tfds

    try:
        return tfds.load(
            spec.name, split=tfds_split, data_dir=config.data_dir, download=False, **kwargs
        )
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError):
        raise _missing(spec, config, tfds_split) from None


def is_tfds(dataset):
    return dataset in SPECS


def tfds_source(config, split, input_context, *, shuffle, seed):
    """A ``Source`` for a TFDS-backed paper dataset (this worker's shard of it)."""
    import tensorflow_datasets as tfds

    spec = SPECS[config.dataset]
    name = _tfds_split(spec, split)
    if spec.decode is None:  # small: decode the whole split once, serve from memory
        ds = _load(spec, config, name).map(
            lambda example: example["image"], num_parallel_calls=AUTOTUNE
        )
        images = np.concatenate(list(ds.batch(4096).as_numpy_iterator()))
        return from_array(images, input_context, spec.transform)
    if input_context is not None and input_context.num_input_pipelines > 1:
        # Example-level shards: each worker reads only its part (needs no file count >= workers).
        name = tfds.even_splits(name, n=input_context.num_input_pipelines)[
            input_context.input_pipeline_id
        ]
    ds = _load(
        spec,
        config,
        name,
        shuffle_files=shuffle,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    ds = ds.map(lambda example: example["image"], num_parallel_calls=AUTOTUNE)

    def decode(ds):
        return ds.map(lambda encoded, s: (spec.decode(encoded), s), num_parallel_calls=AUTOTUNE)

    return Source(ds, decode)


def tfds_num_examples(config, split):
    import tensorflow_datasets as tfds

    spec = SPECS[config.dataset]
    ds = _load(
        spec, config, _tfds_split(spec, split), decoders={"image": tfds.decode.SkipDecoding()}
    )
    n = int(ds.cardinality())
    if n < 0:  # unknown cardinality: count (TFDS normally knows it from dataset_info.json)
        n = int(ds.reduce(0, lambda count, _: count + 1))
    return n
