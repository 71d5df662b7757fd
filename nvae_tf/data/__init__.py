"""Data layer: the paper's six datasets, image folders and TFRecord files as tf.data pipelines.

``load_dataset(config, split)`` is the one entry point; ``num_examples`` sizes an epoch without
reading the data; ``DataError`` carries the one-line message for missing or bad data.
See docs/datasets.md for where each dataset must be on disk.
"""

from nvae_tf.data.bundled import bundled_mnist_arrays
from nvae_tf.data.errors import DataError
from nvae_tf.data.pipeline import load_dataset, load_raw_images, num_examples
from nvae_tf.data.tfrecord import write_tfrecords

__all__ = [
    "DataError",
    "bundled_mnist_arrays",
    "load_dataset",
    "load_raw_images",
    "num_examples",
    "write_tfrecords",
]
