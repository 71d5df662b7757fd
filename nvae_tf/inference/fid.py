"""Fréchet Inception Distance (FID, Heusel et al. 2017) of model samples against reference images.

Both image sets go through Keras' ``InceptionV3`` without its top, average-pooled (2048-d
features), on images resized to 299x299 (bilinear, no antialiasing, as pytorch-fid) with the
Inception preprocessing (pixels to [-1, 1]). A Gaussian is fitted to each set's features and
FID is the Fréchet distance between the two, in float64.

The numbers depend on the network's weights: Keras' ImageNet weights are not the 2015
TensorFlow Inception graph of the original TTUR code that pytorch-fid (and the NVAE paper,
through it) uses, so FIDs from this module rank models but are not comparable with published
values. Every result
names the network that produced it (``InceptionFeatures.description``).

Reference statistics are slow to compute and shared by every model of a dataset, so they are
cached on disk keyed by the images' identity (dataset and location, or the folder's file list),
their number and the network (a hash of its weights values and its input size); a change in
any of these gives a new key and the statistics are recomputed.
"""

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from nvae_tf.inference.sampling import check_finite, decoder_images

INCEPTION_SIZE = 299
MIN_INCEPTION_SIZE = 75  # the smallest input Keras' InceptionV3 accepts without its top
FEATURE_DIM = 2048
WEIGHT_CHOICES = ("imagenet", "random")  # or the path of a weights file


class FIDError(ValueError):
    """A problem with the network weights or the reference images (one-line message)."""


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean (D,) and covariance (D, D) of ``count`` feature vectors, float64."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features):
        accumulator = FeatureAccumulator()
        accumulator.add(features)
        return accumulator.result()


class FeatureAccumulator:
    """Running float64 sums of features and their outer products: no feature is kept."""

    def __init__(self):
        self.count, self.total, self.outer = 0, 0.0, 0.0

    def add(self, features):
        features = np.asarray(features, np.float64)
        self.count += len(features)
        self.total = self.total + features.sum(axis=0)
        self.outer = self.outer + features.T @ features

    def result(self):
        """The statistics so far; covariance with the N - 1 denominator (as ``np.cov``)."""
        if self.count < 2:
            raise FIDError(f"FID needs at least 2 images per set, got {self.count}")
        mean = self.total / self.count
        covariance = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return FeatureStatistics(mean, covariance, self.count)


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two Gaussians, float64.

    tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2) (similar to S_a S_b, and symmetric positive semi-definite). Own
    code rather than ``scipy.linalg.sqrtm`` of the product: the symmetric form stays real
    and exact when the covariances are rank-deficient (fewer images than 2048 dimensions),
    where sqrtm of the non-symmetric product returns complex round-off.
    """
    mean_a, mean_b = (np.asarray(s.mean, np.float64) for s in (a, b))
    cov_a, cov_b = (np.asarray(s.covariance, np.float64) for s in (a, b))
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape:
        raise FIDError(f"feature sizes differ: {mean_a.shape} and {mean_b.shape}")
    values, vectors = np.linalg.eigh((cov_a + cov_a.T) / 2)
    root_a = (vectors * np.sqrt(_nonnegative(values))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(_nonnegative(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def _nonnegative(eigenvalues):
    """Eigenvalues with round-off below numpy's rank tolerance set to 0 (their square roots
    would otherwise add ~sqrt(eps) each)."""
    tolerance = np.abs(eigenvalues).max(initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


class InceptionFeatures:
    """Keras' InceptionV3 (no top, average pooling): 2048-d features of images in [0, 1].

    ``weights``: "imagenet" (Keras downloads the file on first use and keeps it in
    ~/.keras/models; needs internet once), the path of a local weights file (e.g. Keras'
    ``inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5``), or "random" (an untrained
    network seeded with ``seed``: for testing the plumbing, its FIDs mean nothing).
    ``input_size`` 299 is the standard; smaller sizes (>= 75) run faster for plumbing checks
    and give other numbers.
    """

    def __init__(self, weights: str = "imagenet", input_size: int = INCEPTION_SIZE, seed: int = 0):
        if input_size < MIN_INCEPTION_SIZE:
            raise FIDError(f"the Inception input size must be >= 75, got {input_size}")
        if weights == "random":
            keras.utils.set_random_seed(seed)  # InceptionV3 draws its initial weights globally
            source = None
        elif weights == "imagenet":
            source = "imagenet"
        elif os.path.isfile(weights):
            source = weights
        else:
            raise FIDError(
                f"Inception weights {weights!r}: no such file (use a weights file, "
                "'imagenet' or 'random')"
            )
        try:
            self.network = keras.applications.InceptionV3(
                include_top=False,
                weights=source,
                input_shape=(input_size, input_size, 3),
                pooling="avg",
            )
        except Exception as e:  # Keras raises several types for bad files and failed downloads
            hint = " (Keras downloads them on first use: needs internet)" * (source == "imagenet")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FIDError(f"cannot load the Inception weights {weights}{hint}: {reason}") from None
        self.input_size = int(input_size)
        digest = hashlib.sha256()
        for variable in self.network.weights:
            digest.update(np.asarray(variable).tobytes())
        self.weights_sha256 = digest.hexdigest()
        name = "untrained (random)" if weights == "random" else weights
        self.description = (
            f"keras.applications.InceptionV3, weights {name} (sha256 "
            f"{self.weights_sha256[:12]}), input {input_size}x{input_size}"
        )
        self._features = tf.function(self._features_of, reduce_retracing=True)

    @property
    def identity(self):
        """What makes two feature sets comparable: the network's weights and input size."""
        return {"network": "InceptionV3", "weights_sha256": self.weights_sha256,
                "input_size": self.input_size}  # fmt: skip

    def _features_of(self, images):
        size = [self.input_size, self.input_size]
        pixels = tf.image.resize(images * 255.0, size, method="bilinear")
        inputs = keras.applications.inception_v3.preprocess_input(pixels)
        return self.network(inputs, training=False)

    def __call__(self, images) -> np.ndarray:
        """(B, H, W, 1 or 3) images in [0, 1] -> (B, 2048) float64 features."""
        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape[-1] == 1:  # greyscale: the same value in R, G and B
            images = tf.tile(images, [1, 1, 1, 3])
        return np.asarray(self._features(images), np.float64)


def statistics_of(batches, extractor, progress=None) -> FeatureStatistics:
    """Feature statistics of an iterable of image batches; ``progress(images_done)``."""
    accumulator = FeatureAccumulator()
    for batch in batches:
        accumulator.add(extractor(batch))
        if progress is not None:
            progress(accumulator.count)
    return accumulator.result()


def sample_statistics(
    model,
    extractor,
    num_samples: int,
    temperature: float = 1.0,
    batch_size: int = 100,
    seed: int = 0,
    progress=None,
) -> FeatureStatistics:
    """Feature statistics of ``num_samples`` prior samples at latent ``temperature``.

    Pixels are Bernoulli means for binary data and the logistic mixture's mean for colour
    images, as the original's FID code. Raises NonFiniteSamplesError on NaN/Inf samples.
    """
    base = model.stateless_seed(seed)

    @tf.function(reduce_retracing=True)
    def draw(count, batch_seed):
        decoder = model.prior_output_distribution(count, temperature, seed=batch_seed)
        return decoder_images(decoder, mean=True)

    def batches():
        for index, start in enumerate(range(0, num_samples, batch_size)):
            count = min(batch_size, num_samples - start)
            batch_seed = tf.random.experimental.stateless_fold_in(base, index)
            yield check_finite(draw(count, tf.cast(batch_seed, tf.int64)), "samples")

    return statistics_of(batches(), extractor, progress)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Reference images: a description, the key that identifies them, their number, and
    ``batches(input_size)``, a tf.data pipeline of float32 batches in [0, 1]."""

    description: str
    key: dict
    count: int
    batches: Callable[[int], tf.data.Dataset]


def dataset_reference(
    config, split: str = "train", num_images: int | None = None, batch_size: int = 64
) -> Reference:
    """The run's dataset: its 8-bit images (for binary data, the grey levels that the
    binarization draws from; the samples are Bernoulli means, probabilities too)."""
    from nvae_tf.data import load_raw_images, num_examples

    total = num_examples(config, split)
    count = total if num_images is None else min(total, num_images)
    data_dir = os.path.abspath(config.data_dir) if config.data_dir else None
    key = {
        "dataset": config.dataset,
        "data_dir": data_dir,
        "files": _fingerprint(data_dir) if data_dir else None,
        "split": split,
        "image_size": config.image_size,
        "image_channels": config.image_channels,
    }

    def batches(_input_size):
        ds = load_raw_images(config, split, batch_size, count)
        return ds.map(lambda images: tf.cast(images, tf.float32) / 255.0)

    return Reference(f"{config.dataset} {split} split", key, count, batches)


def folder_reference(path: str, num_images: int | None = None, batch_size: int = 64) -> Reference:
    """Every PNG/JPEG under ``path`` (recursively, sorted), as RGB, resized one by one."""
    from PIL import Image

    from nvae_tf.data.folder import list_files

    if not os.path.isdir(path):
        raise FIDError(f"reference folder {path} does not exist")
    files = list_files(path)
    for name in files:
        try:
            with Image.open(name) as image:
                fmt = image.format
        except Exception as e:  # PIL raises many types for non-images
            raise FIDError(f"reference image {name} is not readable ({type(e).__name__})") from None
        if fmt not in ("PNG", "JPEG"):
            raise FIDError(f"reference image {name} is {fmt}; expected PNG or JPEG")
    files = files[:num_images] if num_images is not None else files
    if len(files) < 2:
        raise FIDError(f"reference folder {path} holds {len(files)} image(s); FID needs 2 or more")
    key = {"folder": os.path.abspath(path), "files": _fingerprint(path)}

    def batches(input_size):
        def read(name):
            image = tf.io.decode_image(tf.io.read_file(name), channels=3, expand_animations=False)
            size = [input_size, input_size]
            return tf.image.resize(tf.cast(image, tf.float32) / 255.0, size, method="bilinear")

        ds = tf.data.Dataset.from_tensor_slices(files)
        return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    return Reference(f"image folder {path}", key, len(files), batches)


def _fingerprint(root):
    """Hash of the relative path, size and modification time of every file under ``root``."""
    from nvae_tf.data.folder import list_files

    digest = hashlib.sha256()
    for name in list_files(root):
        info = os.stat(name)
        digest.update(
            f"{os.path.relpath(name, root)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()


class StatisticsCache:
    """Reference statistics on disk: ``<directory>/<hash of key>.npz`` holding the mean, the
    covariance, the count and the key itself (checked on load). Read without pickle."""

    def __init__(self, directory):
        self.directory = directory

    def path(self, key):
        text = json.dumps(key, sort_keys=True)
        return os.path.join(self.directory, hashlib.sha256(text.encode()).hexdigest()[:20] + ".npz")

    def load(self, key):
        """The stored statistics for ``key``, or None (absent, unreadable or another key)."""
        try:
            with np.load(self.path(key), allow_pickle=False) as stored:
                if str(stored["key"]) != json.dumps(key, sort_keys=True):
                    return None
                return FeatureStatistics(stored["mean"], stored["covariance"], int(stored["count"]))
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile):
            return None

    def store(self, key, statistics):
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(key)
        partial = path + ".partial.npz"  # np.savez adds .npz to names without it
        np.savez(
            partial,
            mean=statistics.mean,
            covariance=statistics.covariance,
            count=statistics.count,
            key=json.dumps(key, sort_keys=True),
        )
        os.replace(partial, path)  # readers never see a half-written file
        return path


class CachedStatistics(NamedTuple):
    statistics: FeatureStatistics
    reused: bool  # read from the cache rather than computed
    path: str | None  # the cache file


def reference_statistics(
    reference: Reference, extractor, cache=None, progress=None
) -> CachedStatistics:
    """The reference's feature statistics, read from ``cache`` when stored there."""
    key = {**reference.key, "count": reference.count, **extractor.identity}
    path = cache.path(key) if cache is not None else None
    stored = cache.load(key) if cache is not None else None
    if stored is not None:
        return CachedStatistics(stored, True, path)
    statistics = statistics_of(reference.batches(extractor.input_size), extractor, progress)
    if cache is not None:
        cache.store(key, statistics)
    return CachedStatistics(statistics, False, path)


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/nvae-tf/fid (~/.cache/nvae-tf/fid)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "nvae-tf", "fid")
