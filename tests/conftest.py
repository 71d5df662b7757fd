"""Shared fixtures (helpers that are not fixtures live in support.py and tiny_runs.py).

``tiny_config`` / ``colour_config`` return the config factories of support.py.
``bernoulli_model`` / ``colour_model`` are session-wide built models for READ-ONLY tests
(shapes, sampling, seeds): a test that changes weights must build its own.

``seeded`` fixes the Keras/TensorFlow/NumPy/Python seeds for a test (the model test modules
use it for every test, and seed their shared models too), so random weights and inputs, and
with them every numerical margin, are the same from run to run.

Every test ends with the float32 Keras policy restored, whatever it set. TensorFlow's C++
start-up log is silenced here once for every test module (and the subprocesses they start),
whose optimized-graph cache is a temporary folder.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The optimized-graph cache (nvae_tf.graph_cache) of this run and its subprocesses: a private
# folder, not the user's ~/.cache.
if "NVAE_TF_GRAPH_CACHE" not in os.environ:
    os.environ["NVAE_TF_GRAPH_CACHE"] = tempfile.mkdtemp(prefix="nvae-tf-test-graphs-")
    atexit.register(shutil.rmtree, os.environ["NVAE_TF_GRAPH_CACHE"], ignore_errors=True)

import keras
import pytest
from support import SEED, colour_config, tiny_config


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(name="colour_config")
def _colour_config_fixture():
    return colour_config


@pytest.fixture
def seeded():
    """Fixed global seeds for one test."""
    keras.utils.set_random_seed(SEED)


@pytest.fixture(scope="session")
def bernoulli_model():
    from nvae_tf.model import NVAE

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(SEED + 1)
    return NVAE(tiny_config())


@pytest.fixture(scope="session")
def colour_model():
    from nvae_tf.model import NVAE

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(SEED + 2)
    return NVAE(colour_config())


@pytest.fixture(autouse=True)
def _restore_float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")
