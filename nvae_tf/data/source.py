"""What every dataset backend hands to the pipeline: a sharded stream of raw elements plus a decoder.

Raw elements are cheap (indices, file paths, serialized records, encoded bytes), so shuffling
and iterator checkpoints hold those rather than decoded images; ``decode`` turns a dataset of
``(raw, seed)`` into ``(uint8 HWC image, seed)`` and may drop elements (skipped bad files).
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Source:
    elements: tf.data.Dataset  # raw elements of this worker's shard, in a fixed order
    decode: Callable[[tf.data.Dataset], tf.data.Dataset]  # (raw, seed) -> (uint8 image, seed)
    size: int | None = None  # elements in the shard when known cheaply: shuffle them all
    python_decode: bool = False  # decode calls stateless Python: checkpoint iterators anyway


def shard(ds, input_context):
    """Keep this worker's share of ``ds`` (every n-th element) under tf.distribute."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return ds
    return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def shard_size(n, input_context):
    """Elements that ``shard`` keeps out of ``n``."""
    if input_context is None:
        return n
    k, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    return len(range(i, n, k))


def from_array(images, input_context, transform=None):
    """Source over a uint8 NHWC array held in memory (the cache for small sets).

    Elements are indices, so a full shuffle and an iterator checkpoint cost 8 bytes an image.
    """
    images = tf.convert_to_tensor(images, tf.uint8)
    n = int(images.shape[0])

    def decode(ds):
        def one(index, seed):
            image = tf.gather(images, index)
            return (transform(image) if transform else image), seed

        return ds.map(one, num_parallel_calls=AUTOTUNE)

    return Source(
        shard(tf.data.Dataset.range(n), input_context), decode, shard_size(n, input_context)
    )
