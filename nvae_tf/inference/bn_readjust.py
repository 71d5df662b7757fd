"""Batch-norm re-adjustment for sampling (paper §4.2, docs/design.md#sampling), per temperature.

Samples at a reduced temperature have other activation statistics than the training data, so
the decoder's BN moving averages are re-estimated from prior samples: ``num_passes`` sampling
passes of ``batch_size`` images with batch norm in training mode, updating the moving
averages with the usual momentum (PyTorch 0.05 = Keras 0.95) and no reset beforehand, exactly
as the original (500 passes of 16). Encoder-only BNs never run and stay untouched.

Re-adjusting is slow, so the result is stored next to the checkpoint::

    RUN/bn_readjusted/t0.6/state.json     checkpoint it belongs to, temperature, passes, batch
    RUN/bn_readjusted/t0.6/stats.*        tf.train.Checkpoint of the decoder BN moving stats

and reused by the next call at the same temperature; a newer checkpoint (or other passes /
batch size) makes it stale and it is recomputed.
"""

import json
import logging
import os
import shutil

import numpy as np
import tensorflow as tf

from nvae_tf import graph_optimization
from nvae_tf.inference.sampling import NonFiniteSamplesError
from nvae_tf.layers.normalization import BatchNorm

DEFAULT_PASSES = 500
DEFAULT_BATCH_SIZE = 16
STORE_DIR = "bn_readjusted"
STATE_FILE = "state.json"
STATS_PREFIX = "stats"

log = logging.getLogger(__name__)


def decoder_batchnorm_layers(model):
    """The BN layers a prior pass runs: decoder cells of every group and the post-process."""
    layers = []
    for block in [cell for group in model.groups for cell in group.cells] + list(model.postprocess):
        layers += [layer for layer in block._flatten_layers() if isinstance(layer, BatchNorm)]
    return layers


def readjust_batchnorm(
    model, temperature, num_passes=DEFAULT_PASSES, batch_size=DEFAULT_BATCH_SIZE, seed=0
):
    """Update the decoder BN moving statistics in place from prior samples at ``temperature``.

    Raises NonFiniteSamplesError (and restores the old statistics) if they become NaN or Inf.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if num_passes < 1 or batch_size < 1:
        raise ValueError(
            f"BN re-adjustment needs at least one pass of one sample, got "
            f"{num_passes} passes of {batch_size}"
        )
    variables = _moving_stats(model)
    before = [v.numpy() for v in variables]
    base = model.stateless_seed(seed)

    @graph_optimization.function
    def one_pass(index):
        seed = tf.cast(tf.random.experimental.stateless_fold_in(base, index), tf.int64)
        model.prior_output_distribution(batch_size, temperature, training=True, seed=seed)

    for index in range(num_passes):
        one_pass(tf.constant(index))
    if not all(np.isfinite(v.numpy()).all() for v in variables):
        for variable, value in zip(variables, before):
            variable.assign(value)
        raise NonFiniteSamplesError(
            f"batch-norm re-adjustment at temperature {temperature:g} produced NaN/Inf "
            "statistics (original NVAE issue #36); sample without re-adjustment or at another "
            "temperature"
        )


def store_path(run_dir, temperature):
    return os.path.join(run_dir, STORE_DIR, f"t{temperature:g}")


def load_or_readjust(
    model,
    run_dir,
    temperature,
    checkpoint,
    num_passes=DEFAULT_PASSES,
    batch_size=DEFAULT_BATCH_SIZE,
    seed=0,
):
    """Give ``model`` re-adjusted BN statistics for ``temperature``: stored ones if they
    belong to ``checkpoint`` (the path the model was restored from) and were made with the
    same passes and batch size, otherwise recomputed and stored. Returns True if reused.
    """
    path = store_path(run_dir, temperature)
    state = {
        "checkpoint": os.path.basename(checkpoint),
        "checkpoint_mtime_ns": os.stat(checkpoint + ".index").st_mtime_ns,
        "temperature": float(temperature),
        "num_passes": int(num_passes),
        "batch_size": int(batch_size),
        "layers": [
            layer.path.split("/", 1)[-1]  # without the model's instance name
            for layer in decoder_batchnorm_layers(model)
        ],
    }
    if _stored_state(path) == state:
        _stats_checkpoint(model).read(os.path.join(path, STATS_PREFIX)).assert_consumed()
        log.info("reusing re-adjusted BN statistics from %s", path)
        return True
    log.info(
        "re-adjusting BN statistics at temperature %g (%d passes of %d samples)",
        temperature,
        num_passes,
        batch_size,
    )
    readjust_batchnorm(model, temperature, num_passes, batch_size, seed)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    _stats_checkpoint(model).write(os.path.join(path, STATS_PREFIX))
    with open(os.path.join(path, STATE_FILE), "w") as f:  # last: marks the stats complete
        json.dump(state, f, indent=1)
    log.info("stored re-adjusted BN statistics in %s", path)
    return False


def _moving_stats(model):
    return [
        v
        for layer in decoder_batchnorm_layers(model)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def _stats_checkpoint(model):
    """A checkpoint of just the decoder BN moving statistics, named by position."""
    return tf.train.Checkpoint(**{f"v{i}": v for i, v in enumerate(_moving_stats(model))})


def _stored_state(path):
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
