"""``load_dataset``: the config's dataset as a batched, prefetched ``tf.data`` pipeline.

Order of operations: this worker's shard of cheap raw elements -> shuffle -> repeat -> pair each
element with a number from ``Dataset.random`` -> parallel decode -> flip / binarize / quantize
(stateless ops keyed by that number) -> batch -> prefetch. Because all randomness comes from
seeded tf.data datasets, a ``tf.train.Checkpoint(iterator=...)`` saves the exact data position,
and with ``deterministic_data`` a restored iterator continues with identical batches; each new
pass over a split still draws fresh flips and binarizations.
"""

import tensorflow as tf

from nvae_tf.config import NVAEConfig
from nvae_tf.data import bundled, folder, preprocess, tfds_sources, tfrecord
from nvae_tf.data.errors import DataError
from nvae_tf.data.source import AUTOTUNE, from_array

SPLITS = ("train", "test")
HOW_TO_GET = {
    "celebahq256": " (CelebA-HQ 256: GLOW's celeba-tfr train/ and validation/ folders, whose -r08- files "
    "hold 256x256 images, or 27,000 / 3,000 PNGs)",
    "ffhq256": " (FFHQ 256: the 70,000 FFHQ images resized to 256x256 PNGs, or StyleGAN's ffhq-r08.tfrecords)",
}


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _local_kind(config):
    """'tfrecord' or 'folder' for the sets read from local files."""
    if config.dataset == "tfrecord":
        return "tfrecord"
    if config.dataset == "folder":
        return "folder"
    if config.data_dir and tfrecord.has_files(config.data_dir, config.image_size):
        return "tfrecord"
    return "folder"


def _source(config, split, input_context, *, shuffle, seed):
    hint = HOW_TO_GET.get(config.dataset, "")
    if config.dataset == "bundled_mnist":
        x_train, _, x_test, _ = bundled.bundled_mnist_arrays()
        images = (x_train if split == "train" else x_test)[..., None]
        return from_array(images, input_context, preprocess.pad_mnist)
    if tfds_sources.is_tfds(config.dataset):
        return tfds_sources.tfds_source(config, split, input_context, shuffle=shuffle, seed=seed)
    if _local_kind(config) == "tfrecord":
        return tfrecord.tfrecord_source(
            config, split, input_context, shuffle=shuffle, seed=seed, hint=hint
        )
    return folder.folder_source(config, split, input_context, hint=hint)


def num_examples(config: NVAEConfig, split: str) -> int:
    """Images in the whole ``split`` (all workers), without reading a TFDS set; folders are scanned."""
    _check_split(split)
    if config.dataset == "bundled_mnist":
        return bundled.NUM_EXAMPLES[split]
    if tfds_sources.is_tfds(config.dataset):
        return tfds_sources.tfds_num_examples(config, split)
    hint = HOW_TO_GET.get(config.dataset, "")
    if _local_kind(config) == "tfrecord":
        return tfrecord.tfrecord_num_examples(config, split, hint)
    return folder.folder_num_examples(config, split, hint)


def _batch_size(config, global_batch_size, input_context):
    if input_context is None:
        return global_batch_size or config.batch_size
    if global_batch_size is None:  # config.batch_size is per replica, as in the paper
        global_batch_size = config.batch_size * input_context.num_replicas_in_sync
    try:
        return input_context.get_per_replica_batch_size(global_batch_size)
    except ValueError as e:
        raise DataError(f"global batch size {global_batch_size}: {e}") from None


def _noise_seed(seed, split, input_context):
    """Distinct, reproducible noise streams per split and worker."""
    worker = input_context.input_pipeline_id if input_context is not None else 0
    return (seed * 1_000_003 + worker * 2 + (split != "train")) % 2**63


def load_dataset(
    config: NVAEConfig,
    split: str,
    *,
    global_batch_size: int | None = None,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    seed: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Float32 NHWC batches in [0, 1] of ``split`` ("train" or "test") of ``config.dataset``.

    Defaults: train shuffles, repeats forever, flips (colour sets, ``random_flip``) and drops the
    last partial batch; test does none of these. MNIST is dynamically binarized on every read,
    test split included. The batch is ``global_batch_size`` or ``config.batch_size``; with an
    ``input_context`` (``strategy.distribute_datasets_from_function``) this worker reads only its
    shard and batches per replica (``config.batch_size`` when no global size is given).
    ``seed`` defaults to ``config.seed``. Missing or bad data raises ``DataError``.
    """
    _check_split(split)
    train = split == "train"
    shuffle = train if shuffle is None else shuffle
    repeat = train if repeat is None else repeat
    seed = config.seed if seed is None else seed
    batch_size = _batch_size(config, global_batch_size, input_context)

    source = _source(config, split, input_context, shuffle=shuffle, seed=seed)
    ds = source.elements
    if shuffle:
        ds = ds.shuffle(
            source.size or config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        ds = ds.repeat()
    noise = tf.data.Dataset.random(
        seed=_noise_seed(seed, split, input_context), rerandomize_each_iteration=True
    )
    ds = source.decode(tf.data.Dataset.zip(ds, noise))
    flip = train and config.random_flip and not config.is_mnist
    ds = ds.map(
        lambda image, s: preprocess.to_model_input(image, s, num_bits=config.num_x_bits, flip=flip),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=train).prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = config.deterministic_data
    if source.python_decode:  # a py_function holds no state: save the iterator without it
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options)


def load_raw_images(config, split, batch_size, num_images=None):
    """The ``split``'s uint8 images in fixed order, before flips, binarization or bit reduction.

    The dataset's own pixels (MNIST padded to 32x32, CelebA 64 cropped and resized, as for
    training), batched; FID compares samples with these. ``num_images`` keeps the first ones.
    """
    _check_split(split)
    source = _source(config, split, None, shuffle=False, seed=config.seed)
    noise = tf.data.Dataset.random(seed=config.seed)  # unused: decoders take (raw, seed)
    ds = source.decode(tf.data.Dataset.zip(source.elements, noise)).map(lambda image, _: image)
    if num_images is not None:
        ds = ds.take(num_images)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
